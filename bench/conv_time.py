"""The causal depthwise conv + SiLU alone, forward and forward + backward, on one GPU: median ms over repeats per
tile setting, and the agreement of the output and every gradient with torch's conv in fp32.

    python3 bench/conv_time.py [--shapes 64,256,2048 ...] [--tiles 16:64:256 32:128:512 ...]
Shapes are (batch, d_inner, length), bf16, the input a column slice of a 4 x d_inner wide tensor (as the model's
conv reads in_proj's output in place). Rows: torch's conv (compiled), causal_conv1d's where installed, the
script's Triton conv at its CONV_TILE, then at each --tiles value (time steps per block : channels per block :
time steps per program). GB/s counts the bytes the conv must move at least (forward: x read, output written;
backward: those plus dout read and dx written), over fwd+bwd time.
"""
import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def outputs_and_grads(conv, wide, w, bias, dout, d):
    leaves = [t.detach().clone().requires_grad_() for t in (wide, w, bias)]
    out = conv(leaves[0][:, :, d : 2 * d], *leaves[1:])
    return [out, *torch.autograd.grad(out, leaves, dout)]


def timed(conv, wide, w, bias, dout, d, backward):
    leaves = [t.detach().clone().requires_grad_() for t in (wide, w, bias)]
    fn = lambda: conv(leaves[0][:, :, d : 2 * d], *leaves[1:])
    step = (lambda: torch.autograd.grad(fn(), leaves, dout)) if backward else fn
    return triton.testing.do_bench(step, warmup=10, rep=100, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["64,256,2048", "64,512,2048"])
    p.add_argument("--tiles", nargs="*", default=[], help="BT:BD:TP values of CONV_TILE to time besides the script's")
    a = p.parse_args()
    own = tg.CONV_TILE
    print(f"{'shape (b, d, t)':<18} {'conv':<28} {'fwd ms':>8} {'fwd+bwd':>8} {'GB/s':>6} {'max rel err':>11}")
    for shape in a.shapes:
        b, d, t = map(int, shape.split(","))
        g = torch.Generator(device="cuda").manual_seed(0)
        wide = torch.randn(b, t, 4 * d, device="cuda", generator=g).bfloat16()
        w, bias = torch.randn(d, 4, device="cuda", generator=g) * 0.5, torch.randn(d, device="cuda", generator=g)
        dout = torch.randn(b, t, d, device="cuda", generator=g).bfloat16()
        ref = outputs_and_grads(tg.causal_conv_torch, wide.float(), w, bias, dout.float(), d)
        moved = 2 * b * t * d * (2 + 3)  # bf16: x and the output; dout, x and dx
        variants = [("torch (compiled)", torch.compile(tg.causal_conv_torch, dynamic=False), own)]
        if tg._unavailable("causal_conv1d", torch.device("cuda")) is None:
            variants.append(("causal_conv1d", tg.causal_conv_cuda, own))
        variants += [(f"triton {':'.join(map(str, tile))}", tg.triton_conv, tile)
                     for tile in [own] + [tuple(map(int, s.split(":"))) for s in a.tiles]]
        for name, conv, tile in variants:
            tg.CONV_TILE = tile
            try:
                err = max(((x.float() - r).norm() / r.norm()).item()
                          for x, r in zip(outputs_and_grads(conv, wide, w, bias, dout, d), ref))
                f, fb = timed(conv, wide, w, bias, dout, d, False), timed(conv, wide, w, bias, dout, d, True)
            except Exception as e:  # a tile out of registers or shared memory: report and go on
                print(f"{str((b, d, t)):<18} {name:<28} {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            finally:
                tg.CONV_TILE = own
            print(f"{str((b, d, t)):<18} {name:<28} {f:8.3f} {fb:8.3f} {moved / fb / 1e6:6.0f} {err:11.2e}",
                  flush=True)


if __name__ == "__main__":
    main()
