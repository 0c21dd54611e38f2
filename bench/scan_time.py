"""The selective scan alone, forward + backward, per backend and shape (one GPU): median ms over repeats.

    python3 bench/scan_time.py
Shapes (batch, d_inner, d_state, length) in bf16: the model's own (32, 512, 8, 2048) and mamba-ssm's reference
(32, 1024, 16, 2048). The Triton kernel is timed at several (channel block, chunk, warps) settings.
"""
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

TRITON_SETTINGS = [(16, 16, 4), (32, 16, 4), (32, 16, 8), (64, 16, 8), (32, 32, 8), (16, 32, 4), (64, 8, 4)]


def inputs(b, d, n, t):
    r = lambda *s: torch.randn(*s, device="cuda")
    leaves = [r(b, t, d).bfloat16(), (r(b, t, d) - 1).bfloat16(), -torch.exp(r(d, n) * 0.5), r(b, t, n).bfloat16(),
              r(b, t, n).bfloat16(), r(d), r(b, t, d).bfloat16(), r(d) * 0.5 - 2]
    return [x.requires_grad_() for x in leaves]


def ms(fn, args, backward=True):
    dout = torch.randn_like(args[0])
    step = (lambda: torch.autograd.grad(fn(*args), args, dout)) if backward else (lambda: fn(*args))
    return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")


def main():
    default = (tg.SCAN_BLOCK_D, tg.SCAN_CHUNK, tg.SCAN_WARPS)
    rows = []
    for shape in [(32, 512, 8, 2048), (32, 1024, 16, 2048)]:
        args = inputs(*shape)
        rows.append((shape, "mamba_ssm", ms(tg.mamba_scan, args, False), ms(tg.mamba_scan, args)))
        for setting in TRITON_SETTINGS:
            tg.SCAN_BLOCK_D, tg.SCAN_CHUNK, tg.SCAN_WARPS = setting
            try:
                rows.append((shape, "triton BD,K,W=%d,%d,%d" % setting, ms(tg.triton_scan, args, False), ms(tg.triton_scan, args)))
            except Exception as e:  # e.g. out of shared memory or registers at this setting
                print(shape, setting, type(e).__name__, str(e)[:200])
        tg.SCAN_BLOCK_D, tg.SCAN_CHUNK, tg.SCAN_WARPS = default
    print(f"\n{'shape (b, d, n, t)':<24} {'backend':<22} {'fwd ms':>8} {'fwd+bwd ms':>10}")
    for shape, name, f, fb in rows:
        print(f"{str(shape):<24} {name:<22} {f:8.3f} {fb:10.3f}")


if __name__ == "__main__":
    main()
