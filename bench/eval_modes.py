"""Score a saved artifact on the val split with each evaluator (one GPU): val_bpb, seconds and tokens/s.

    python3 bench/eval_modes.py final_model.int6.ptz [--lanes 256,64] [--stride 64]
Model, data and tokenizer settings come from train_gpt.py's environment variables (use the training run's).
Flat and sliding scoring run compiled, as in the script; stateful scoring runs eagerly with `lanes` streams.
The last column projects the time for FineWeb's 62.0M val tokens on 8 GPUs at the measured rate.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--lanes", default="256,64")
    p.add_argument("--stride", type=int, default=64)
    a = p.parse_args()
    args, device = tg.Hyperparameters(), torch.device("cuda")
    luts = tg.byte_luts(tg.load_tokenizer(args.tokenizer_path, args.vocab_size), device)
    val = tg.load_validation_tokens(args.val_files, args.vocab_size)
    scan, conv, desc = tg.resolve_backends(args.scan_impl, args.conv_impl, device)
    model = tg.GPT(args, scan, conv).to(device)
    model.load_state_dict(tg.deserialize(open(a.artifact, "rb").read()))
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    batch = max(1, args.val_batch_tokens // args.eval_seq_len)
    runs = [("flat", batch, lambda: tg.evaluate(compiled, val, luts, args.eval_seq_len, 0, batch, 0, 1)),
            (f"sliding stride {a.stride}", batch, lambda: tg.evaluate(compiled, val, luts, args.eval_seq_len, a.stride, batch, 0, 1))]
    for lanes in map(int, a.lanes.split(",")):
        runs.append(("stateful", lanes, lambda lanes=lanes: tg.evaluate_stateful(model, val, luts, args.eval_seq_len, lanes, 0, 1)))
    rows = []
    warm_val = val[: 4 * args.val_batch_tokens]
    tg.evaluate(compiled, warm_val, luts, args.eval_seq_len, 0, batch, 0, 1)  # compile, on a prefix of the split
    tg.evaluate(compiled, warm_val, luts, args.eval_seq_len, a.stride, batch, 0, 1)
    for name, width, score in runs:
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss, bpb = score()
        torch.cuda.synchronize()
        rows.append((name, width, loss, bpb, time.perf_counter() - t))
    print(f"\n{desc}; {val.numel() - 1} val tokens, seq_len {args.eval_seq_len}")
    print(f"{'evaluator':<20} {'batch/lanes':>11} {'val_loss':>10} {'val_bpb':>10} {'seconds':>8} {'tokens/s':>10} {'62M on 8 GPUs':>14}")
    for name, width, loss, bpb, sec in rows:
        rate = (val.numel() - 1) / sec
        print(f"{name:<20} {width:>11} {loss:10.6f} {bpb:10.6f} {sec:8.2f} {rate:10.3g} {62.0e6 / (8 * rate):13.1f}s")


if __name__ == "__main__":
    main()
