"""Training-step time and peak memory on one GPU (synthetic tokens), per scan backend and for the attention-only
control (the same model with SSM_LAYERS empty); with --profile, where the GPU time goes (by kernel category, by
kernel, and the matmuls by their operands' shapes), and with two variants profiled, the difference per category.

    python3 bench/step_time.py [--steps 60] [--impls triton,mamba_ssm,attention] [--profile triton,attention]
Prints one row per variant: median ms/step over the timed steps (after compile and warm-up), tokens/s, peak GiB,
model FLOPs utilisation against the bf16 matmul rate measured here, and the first step's seconds (compile
included: cold on a fresh machine, from the caches after). Model settings come from train_gpt.py's
environment variables.
"""
import argparse
import collections
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def flops_per_token(args) -> float:
    """Matmul FLOPs of one training token (forward + backward = 3x forward), causal attention included."""
    dim, di, kv = args.model_dim, args.ssm_inner, args.num_kv_heads * args.model_dim // args.num_heads
    T = args.train_seq_len
    spans = [T if i in args.global_layers or not args.attn_window else min(args.attn_window, T) for i in range(args.num_layers)]
    attention = sum(dim * dim + dim * 2 * kv + dim * dim + 2 * span * dim for span in spans)  # ATTN_WINDOW's span
    ssm = dim * 2 * di + di * (args.ssm_dt_rank + 2 * args.ssm_state) + args.ssm_dt_rank * di + di * dim
    mlp = 2 * args.mlp_mult * dim * dim
    fwd = 2 * (attention + args.num_layers * mlp + len(args.ssm_layers) * ssm + args.vocab_size * dim + args.value_embed_dim * kv)
    return 3 * fwd


def matmul_tflops() -> float:
    a, b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16), torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * reps / (time.perf_counter() - t) / 1e12


def category(name: str) -> str:
    n = name.lower()
    for key, cat in (("scan", "selective scan"), ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"), ("flex", "attention"), ("triton_tem", "attention"),
                     ("gemm", "matmul"), ("nvjet", "matmul"), ("cutlass", "matmul"), ("sm90", "matmul"),
                     ("triton", "fused elementwise (inductor)"), ("reduce", "reductions"), ("copy", "copies"),
                     ("elementwise", "eager elementwise"), ("foreach", "optimizer (foreach)")):
        if key in n:
            return cat
    return "other"


def gpu_times(events, steps: int) -> tuple[collections.Counter, collections.Counter]:
    """ms per step on the GPU by kernel and by category. Annotated ranges (Inductor's "## Call CompiledFxGraph ##",
    "Optimizer.step#...") are not kernels: they span the kernels they launch and would count them twice."""
    kernels, cats = collections.Counter(), collections.Counter()
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation:
            kernels[e.name] += e.device_time / 1e3 / steps
            cats[category(e.name)] += e.device_time / 1e3 / steps
    return kernels, cats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--impls", default="triton,mamba_ssm,attention")
    p.add_argument("--profile", default="", help="variants to profile, comma-separated (top kernels and categories, ms per step)")
    a = p.parse_args()
    args = tg.Hyperparameters()
    hybrid_layers = args.ssm_layers
    peak = matmul_tflops()
    rows, profiles = [], {}
    for impl in a.impls.split(","):
        args.ssm_layers = [] if impl == "attention" else hybrid_layers
        torch.manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        scan, conv, desc = tg.resolve_backends("torch" if impl == "attention" else impl, args.conv_impl, torch.device("cuda"))
        desc = "no Mamba branch (SSM_LAYERS empty)" if impl == "attention" else desc
        model = tg.GPT(args, scan, conv).cuda()
        opts = tg.build_optimizers(args, model, fused=True)
        run = torch.compile(model, fullgraph=True, dynamic=False)
        x = torch.randint(0, args.vocab_size, (a.batch_tokens // args.train_seq_len, args.train_seq_len), device="cuda")

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = run(x, x)
            loss.backward()
            for o in opts:
                o.step()
            model.zero_grad(set_to_none=True)

        times = []
        for i in range(a.warmup + a.steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            if i == 0:
                first_s = time.perf_counter() - t
            if i >= a.warmup:
                times.append(1000 * (time.perf_counter() - t))
        ms = statistics.median(times)
        mfu = flops_per_token(args) * a.batch_tokens / (ms / 1e3) / (peak * 1e12)
        rows.append((impl, desc, ms, a.batch_tokens / ms / 1e3, torch.cuda.max_memory_allocated() / 2**30, mfu))
        print(f"{impl}: {ms:.1f} ms/step, peak {rows[-1][4]:.1f} GiB, MFU {mfu:.1%}; first step (compile) "
              f"{first_s:.1f} s", flush=True)
        if impl in a.profile.split(","):
            n = 5
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
                for _ in range(n):
                    step()
                torch.cuda.synchronize()
            kernels, cats = gpu_times(prof.events(), n)
            profiles[impl] = cats
            print(f"\nprofile of {impl}: GPU kernel time per step {sum(cats.values()):.1f} ms (wall {ms:.1f} ms)")
            for cat, t in cats.most_common():
                print(f"  {t:7.2f} ms  {cat}")
            print("top kernels:")
            for name, t in kernels.most_common(80):
                print(f"  {t:7.2f} ms  {name[:110]}")
            print("matmuls by operand shapes (GPU time of the kernels each launched):")
            mms = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm")]
            for e in sorted(mms, key=lambda e: -e.device_time_total)[:30]:
                print(f"  {e.device_time_total / 1e3 / n:7.2f} ms  {e.count // n:3d}x  {e.key} {e.input_shapes}")
        torch.cuda.empty_cache()
    print(f"\nbf16 matmul rate measured: {peak:.0f} TFLOP/s")
    print(f"{'variant':<10} {'ms/step':>8} {'Mtok/s':>7} {'peak GiB':>8} {'MFU':>6}  backends")
    for impl, desc, ms, tps, mem, mfu in rows:
        print(f"{impl:<10} {ms:8.1f} {tps:7.3f} {mem:8.1f} {mfu:6.1%}  {desc}")
    if len(profiles) > 1:  # where one variant's extra time goes, category by category
        names = list(profiles)
        print(f"\n{'GPU ms per step':<30}{''.join(f'{n:>12}' for n in names)}{names[0] + ' - ' + names[-1]:>24}")
        for cat in sorted(set().union(*profiles.values()), key=lambda c: -profiles[names[0]][c]):
            cells = "".join(f"{profiles[n][cat]:12.2f}" for n in names)
            print(f"{cat:<30}{cells}{profiles[names[0]][cat] - profiles[names[-1]][cat]:+24.2f}")


if __name__ == "__main__":
    main()
