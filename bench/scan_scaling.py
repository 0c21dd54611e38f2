"""How the Triton scan's time grows with its grid: forward and backward ms at growing (sequences, channels, steps),
and the time per program-step. A kernel whose programs run side by side keeps the time flat as sequences and
channels grow; one whose time grows with them is not running its programs at once.

    python3 bench/scan_scaling.py [--script train_gpt.py] [--state 8]
    ncu --clock-control none --launch-skip 4 --launch-count 2 --section Occupancy --section WarpStateStats \
        python3 bench/scan_scaling.py --shapes 64,512,2048     # why, where ncu can read the counters
--script takes any version of the script (e.g. `git show REV:train_gpt.py > /tmp/tg.py`).
"""
import argparse
import importlib.util
import os

import torch
import triton.testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--script", default=os.path.join(ROOT, "train_gpt.py"))
    p.add_argument("--state", type=int, default=8)
    p.add_argument("--shapes", nargs="*", default=["2,64,256", "2,512,256", "16,64,256", "64,512,256", "64,512,2048"])
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("tg", a.script)
    tg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tg)
    print(f"{'(b, d, t)':<18} {'programs':>8} {'fwd ms':>8} {'fwd+bwd ms':>10} {'ns per channel-step':>19}")
    for shape in a.shapes:
        b, d, t = map(int, shape.split(","))
        r = lambda *s: torch.randn(*s, device="cuda")
        args = [x.requires_grad_() for x in [r(b, t, d).bfloat16(), (r(b, t, d) - 1).bfloat16(), -torch.exp(r(d, a.state)),
                r(b, t, a.state).bfloat16(), r(b, t, a.state).bfloat16(), r(d), r(b, t, d).bfloat16(), r(d) * 0.5 - 2]]
        dout = torch.randn_like(args[0])
        fwd = triton.testing.do_bench(lambda: tg.triton_scan(*args), warmup=5, rep=50, return_mode="median")
        both = triton.testing.do_bench(lambda: torch.autograd.grad(tg.triton_scan(*args), args, dout), warmup=5, rep=50,
                                       return_mode="median")
        warps = getattr(tg, "SCAN_WARPS", 1)  # (forward, backward) since 557113e; channels per program before it
        block = getattr(tg, "SCAN_BLOCK_D", 32 * (warps[0] if isinstance(warps, tuple) else warps))
        programs = b * -(-d // block)
        print(f"{str((b, d, t)):<18} {programs:8d} {fwd:8.3f} {both:10.3f} {1e6 * both / (b * d * t):19.3f}", flush=True)


if __name__ == "__main__":
    main()
