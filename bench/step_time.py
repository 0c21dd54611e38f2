"""Training-step time and peak memory of the model under each scan backend (synthetic tokens, one GPU).

    python3 bench/step_time.py [--steps 60] [--batch-tokens 65536] [--impls mamba_ssm,torch]
Prints one row per backend: median ms/step over the timed steps (after compile and warm-up), tokens/s, peak GiB.
Model settings come from the same environment variables as train_gpt.py.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--impls", default="mamba_ssm,triton,torch")
    a = p.parse_args()
    args = tg.Hyperparameters()
    rows = []
    for impl in a.impls.split(","):
        torch.manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        scan, conv, desc = tg.resolve_backends(impl, args.conv_impl, torch.device("cuda"))
        model = tg.GPT(args, scan, conv).cuda()
        opts = tg.build_optimizers(args, model, fused=True)
        run = torch.compile(model, fullgraph=True, dynamic=False)
        x = torch.randint(0, args.vocab_size, (a.batch_tokens // args.train_seq_len, args.train_seq_len), device="cuda")
        times = []
        for i in range(a.warmup + a.steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                loss = run(x, x)
            loss.backward()
            for o in opts:
                o.step()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(1000 * (time.perf_counter() - t))
        ms = statistics.median(times)
        rows.append((impl, desc, ms, a.batch_tokens / ms / 1e3, torch.cuda.max_memory_allocated() / 2**30))
        del model, opts, run
        torch.cuda.empty_cache()
    print(f"\n{'impl':<10} {'ms/step':>8} {'Mtok/s':>7} {'peak GiB':>8}  backends")
    for impl, desc, ms, tps, mem in rows:
        print(f"{impl:<10} {ms:8.1f} {tps:7.3f} {mem:8.1f}  {desc}")


if __name__ == "__main__":
    main()
