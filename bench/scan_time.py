"""The selective scan alone (scan, D skip and SiLU(z) gate), forward and forward + backward, per backend and shape,
on one GPU: median ms over repeats, and the agreement of every output and gradient with mamba-ssm's.

    python3 bench/scan_time.py [--shapes 64,512,8,2048 ...] [--settings SCAN_FWD_STEPS=4,SCAN_WARPS=4:1 ...]
                               [--script OTHER_train_gpt.py]
Shapes are (batch, d_inner, d_state, length), bf16. Rows:
  mamba_ssm        the model's path to mamba-ssm: its (batch, channels, time) layout, so five transposes in and one out
  selective_scan   mamba-ssm's kernels alone on inputs already in its layout (what the issue's "x its time" means)
  triton           the script's kernels at its own settings
  triton NAME=...  the same with some of the script's SCAN_* constants set otherwise (a tuple's items joined by ':')
Each version of the script runs in its own process: two versions in one would register the same custom ops twice.
GB/s counts the bytes the scan must move at least (bf16 inputs read, output written; backward: those plus the
gradients), over fwd+bwd time.
"""
import argparse
import importlib.util
import os
import sys

import torch
import triton.testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(path):
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(b, d, n, t, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    leaves = [r(b, t, d).bfloat16(), (r(b, t, d) - 1).bfloat16(), -torch.exp(r(d, n) * 0.5), r(b, t, n).bfloat16(),
              r(b, t, n).bfloat16(), r(d), r(b, t, d).bfloat16(), r(d) * 0.5 - 2]
    return [x.requires_grad_() for x in leaves]


def mamba_layout(args):
    """The same inputs in mamba-ssm's layout, as new leaves: (batch, channels, time) and (batch, states, time)."""
    t = lambda v: v.detach().transpose(1, 2).contiguous().requires_grad_()
    u, delta, A, B, C, D, z, bias = args
    return [t(u), t(delta), A, t(B), t(C), D, t(z), bias]


def selective_scan(tg):
    return lambda u, delta, A, B, C, D, z, bias: tg.mamba_scan_fwd(u, delta, A, B, C, D, z, bias)[0]


def timed(fn, args, backward):
    dout = torch.randn_like(args[0])
    step = (lambda: torch.autograd.grad(fn(*args), args, dout)) if backward else (lambda: fn(*args))
    return triton.testing.do_bench(step, warmup=10, rep=100, return_mode="median")


def outputs_and_grads(fn, args, dout):
    out = fn(*args)
    return [out, *torch.autograd.grad(out, args, dout)]


def parse_setting(tg, kv):
    """'SCAN_FWD_STEPS=4' -> ('SCAN_FWD_STEPS', 4); a tuple constant's items are joined by ':' ('SCAN_WARPS=4:1')."""
    name, value = kv.split("=")
    if not name.startswith("SCAN_") or not hasattr(tg, name):
        raise SystemExit(f"--settings: {name} is not one of the script's SCAN_* constants")
    items = tuple(int(v) for v in value.split(":"))
    return name, items if isinstance(getattr(tg, name), tuple) else items[0]


def worst_error(fn, args, dout, ref):
    ours = outputs_and_grads(fn, args, dout)
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, ref))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["64,512,8,2048", "64,512,4,2048", "64,256,4,2048",
                                                   "64,1024,8,2048"])
    p.add_argument("--settings", nargs="*", default=[], help="NAME=value,... of the script's SCAN_* constants")
    p.add_argument("--script", default=os.path.join(ROOT, "train_gpt.py"))
    a = p.parse_args()
    tg = load_script(a.script)
    settings = [dict(parse_setting(tg, kv) for kv in s.split(",")) for s in a.settings]
    own = {name: getattr(tg, name) for s in settings for name in s}
    rows = []
    print(f"{'shape (b, d, n, t)':<22} {'backend':<40} {'fwd ms':>8} {'fwd+bwd':>8} {'GB/s':>6} {'max rel err':>11}",
          flush=True)
    for shape in a.shapes:
        b, d, n, t = map(int, shape.split(","))
        args = inputs(b, d, n, t)
        moved = 2 * (b * t * (3 * d + 2 * n) + b * t * d) + 2 * (b * t * (4 * d + 2 * n) + 3 * b * t * d)
        dout = torch.randn_like(args[0], generator=torch.Generator(device="cuda").manual_seed(1))
        ref = outputs_and_grads(tg.mamba_scan, args, dout)
        variants = [("mamba_ssm", tg.mamba_scan, args, {}),
                    ("selective_scan", selective_scan(tg), mamba_layout(args), {}), ("triton", tg.triton_scan, args, {})]
        variants += [("triton " + s, tg.triton_scan, args, setting) for s, setting in zip(a.settings, settings)]
        for name, fn, xs, setting in variants:
            for constant, value in setting.items():
                setattr(tg, constant, value)
            try:
                err = worst_error(fn, args, dout, ref) if xs is args else float("nan")
                f, fb = timed(fn, xs, False), timed(fn, xs, True)
            except Exception as e:  # a setting out of registers or shared memory: report and go on
                print(f"{str((b, d, n, t)):<22} {name:<40} {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            finally:
                for constant, value in own.items():
                    setattr(tg, constant, value)
            rows.append((shape, name, f, fb, moved / fb / 1e6, err))
            print(f"{str((b, d, n, t)):<22} {name:<40} {f:8.3f} {fb:8.3f} {moved / fb / 1e6:6.0f} {err:11.2e}",
                  flush=True)
        del args, ref
        torch.cuda.empty_cache()
    print("\nratios to selective_scan (fwd+bwd), per shape:")
    for shape in a.shapes:
        base = [r[3] for r in rows if r[0] == shape and r[1] == "selective_scan"]
        for r in rows:
            if r[0] == shape and base:
                print(f"  {shape:<18} {r[1]:<40} {r[3] / base[0]:6.3f}")


if __name__ == "__main__":
    main()
