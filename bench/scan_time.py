"""The Mamba branch's non-matmul work on one GPU, forward and forward + backward: median ms over repeats.

    python3 bench/scan_time.py [--batch 64] [--settings 1,8 2,8 1,4]
Per shape (batch, d_inner, d_state, length), in bf16 as in training:
- selective_scan_cuda: mamba-ssm's kernel alone on its own (batch, channels, time) layout (scan, D skip, gate);
- mamba_scan: the same kernel as the model calls it, with the layout copies around it;
- triton W,K: the script's kernel (same work) at SCAN_WARPS=W, SCAN_CHUNK=K;
- branch: causal conv + SiLU, then the script's scan with D skip and gate, compiled as in the model.
The first call of the script's kernel at the default setting is timed too (Triton compiles it then).
"""
import argparse
import os
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def inputs(b, d, n, t):
    r = lambda *s: torch.randn(*s, device="cuda")
    leaves = [r(b, t, d).bfloat16(), (r(b, t, d) - 1).bfloat16(), -torch.exp(r(d, n) * 0.5), r(b, t, n).bfloat16(),
              r(b, t, n).bfloat16(), r(d), r(b, t, d).bfloat16(), r(d) * 0.5 - 2]
    return [x.requires_grad_() for x in leaves]


def ms(fn, args, backward=True):
    dout = torch.randn_like(args[0])
    step = (lambda: torch.autograd.grad(fn(*args), args, dout)) if backward else (lambda: fn(*args))
    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def cuda_kernel_only(u, delta, A, B, C, D, z, bias):
    """selective_scan_cuda forward and backward on inputs already in its layout."""
    import selective_scan_cuda

    t = lambda v: v.detach().transpose(1, 2).contiguous()
    u, delta, z, B, C = t(u), t(delta), t(z), t(B).unsqueeze(1), t(C).unsqueeze(1)
    A, D, bias = A.detach(), D.detach(), bias.detach()
    dout = torch.randn_like(u)

    def fwd():
        return selective_scan_cuda.fwd(u, delta, A, B, C, D, z, bias, True)

    def fwd_bwd():
        out, states, out_z = fwd()
        return selective_scan_cuda.bwd(u, delta, A, B, C, D, z, bias, dout, states, out, None, True, False)

    return [triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") for f in (fwd, fwd_bwd)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--settings", nargs="*", default=["1,4", "1,8", "2,8", "2,4"], help="SCAN_WARPS,SCAN_CHUNK pairs")
    a = p.parse_args()
    settings = [tuple(map(int, s.split(","))) for s in a.settings]
    default = (tg.SCAN_WARPS, tg.SCAN_CHUNK)
    args = inputs(a.batch, 512, 8, 2048)
    torch.cuda.synchronize()
    t = time.perf_counter()
    torch.autograd.grad(tg.triton_scan(*args), args, torch.randn_like(args[0]))
    torch.cuda.synchronize()
    print(f"first call of the script's kernel (forward + backward, compiling both): {time.perf_counter() - t:.1f} s")
    have_mamba = tg._unavailable("selective_scan_cuda", torch.device("cuda")) is None

    def branch(xs, w, cb, delta, A, B, C, D, z, bias):
        return tg.triton_scan(tg.causal_conv_torch(xs, w, cb), delta, A, B, C, D, z, bias)

    compiled_branch = torch.compile(branch, fullgraph=True, dynamic=False)
    rows = []
    for shape in [(a.batch, 512, 8, 2048), (a.batch, 512, 4, 2048), (a.batch, 256, 8, 2048), (a.batch, 1024, 8, 2048)]:
        args = inputs(*shape)
        if have_mamba:
            rows.append((shape, "selective_scan_cuda", *cuda_kernel_only(*args)))
            rows.append((shape, "mamba_scan", ms(tg.mamba_scan, args, False), ms(tg.mamba_scan, args)))
        for setting in settings:
            tg.SCAN_WARPS, tg.SCAN_CHUNK = setting
            try:
                rows.append((shape, "triton W,K=%d,%d" % setting, ms(tg.triton_scan, args, False), ms(tg.triton_scan, args)))
            except Exception as e:  # e.g. out of registers at this setting
                print(shape, setting, type(e).__name__, str(e)[:200])
        tg.SCAN_WARPS, tg.SCAN_CHUNK = default
        conv = [torch.randn(shape[1], 4, device="cuda").mul(0.5).requires_grad_(), torch.zeros(shape[1], device="cuda", requires_grad=True)]
        bargs = [args[0]] + conv + args[1:]
        rows.append((shape, "branch (conv+scan) W,K=%d,%d" % default, ms(compiled_branch, bargs, False), ms(compiled_branch, bargs)))
    print(f"\n{'shape (b, d, n, t)':<22} {'kernel':<30} {'fwd ms':>7} {'fwd+bwd ms':>10} {'vs cuda':>7}")
    cuda = {shape: fb for shape, name, f, fb in rows if name == "selective_scan_cuda"}
    for shape, name, f, fb in rows:
        ratio = f"{fb / cuda[shape]:.2f}x" if shape in cuda else "-"
        print(f"{str(shape):<22} {name:<30} {f:7.3f} {fb:10.3f} {ratio:>7}")


if __name__ == "__main__":
    main()
