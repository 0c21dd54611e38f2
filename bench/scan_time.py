"""The selective scan alone, forward + backward, per backend and shape (one GPU): median ms over repeats.

    python3 bench/scan_time.py
Shapes (batch, d_inner, d_state, length) in bf16: the model's own (32, 512, 8, 2048) and mamba-ssm's reference
(32, 1024, 16, 2048). The Triton kernel is also timed at several channel-block sizes.
"""
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def inputs(b, d, n, t):
    r = lambda *s: torch.randn(*s, device="cuda")
    leaves = [r(b, t, d).bfloat16(), (r(b, t, d) - 1).bfloat16(), -torch.exp(r(d, n) * 0.5), r(b, t, n).bfloat16(),
              r(b, t, n).bfloat16(), r(d), r(b, t, d).bfloat16(), r(d) * 0.5 - 2]
    return [x.requires_grad_() for x in leaves]


def fwd_bwd_ms(fn, args):
    dout = torch.randn_like(args[0])

    def step():
        torch.autograd.grad(fn(*args), args, dout)

    return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")


def main():
    rows = []
    for shape in [(32, 512, 8, 2048), (32, 1024, 16, 2048)]:
        args = inputs(*shape)
        rows.append((shape, "mamba_ssm", fwd_bwd_ms(tg.mamba_scan, args)))
        for block in (16, 32, 64):
            tg.SCAN_BLOCK_D = block
            rows.append((shape, f"triton BD={block}", fwd_bwd_ms(tg.triton_scan, args)))
        tg.SCAN_BLOCK_D = 32
    print(f"\n{'shape (b, d, n, t)':<24} {'backend':<14} {'fwd+bwd ms':>10}")
    for shape, name, ms in rows:
        print(f"{str(shape):<24} {name:<14} {ms:10.3f}")


if __name__ == "__main__":
    main()
