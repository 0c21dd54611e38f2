"""Score a saved artifact on the val split with each evaluator (one GPU, or the CPU): val_bpb, seconds and tokens/s.

    python3 bench/eval_modes.py final_model.int6.ptz [--lanes 256,64] [--stride 64] [--ttt LR:EPOCHS:CHUNK,...]
Model, data and tokenizer settings come from train_gpt.py's environment variables (use the training run's).
Flat and sliding scoring run compiled, as in the script; stateful scoring runs eagerly with `lanes` streams (none:
--lanes ''); each --ttt setting is score-first test-time training over flat windows, compiled, from the artifact's
weights (TTT_LR, TTT_EPOCHS, TTT_CHUNK_TOKENS; its time includes compiling the training step once).
The last column projects the time for FineWeb's 62.0M val tokens on 8 GPUs at the measured rate; for TTT it does
not divide by 8, as the chunks run one after another (each rank gets an eighth of a chunk): an upper bound if a
chunk takes no longer on 8 GPUs than on one.
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
    p.add_argument("--ttt", default="")
    a = p.parse_args()
    args = tg.Hyperparameters()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    luts = tg.byte_luts(tg.load_tokenizer(args.tokenizer_path, args.vocab_size), device)
    val = tg.load_validation_tokens(args.val_files, args.vocab_size, args.eval_seq_len)
    scan, conv, desc = tg.resolve_backends(args.scan_impl, args.conv_impl, device)
    model = tg.GPT(args, scan, conv).to(device)
    weights = tg.deserialize(open(a.artifact, "rb").read())
    model.load_state_dict(weights)
    compiled = torch.compile(model, dynamic=False, fullgraph=True) if args.compile else model
    batch = max(1, args.val_batch_tokens // args.eval_seq_len)
    split = tg.ValSplit(val, luts, args.eval_seq_len, batch)
    runs = [("flat", batch, lambda: tg.evaluate(compiled, split)),
            (f"sliding stride {a.stride}", batch, lambda: tg.evaluate(compiled, split, a.stride))]
    for lanes in (int(v) for v in a.lanes.split(",") if v):
        runs.append(("stateful", lanes, lambda s=split._replace(batch_seqs=lanes): tg.evaluate_stateful(model, s)))

    def ttt(setting):
        args.ttt_lr, args.ttt_epochs, args.ttt_chunk_tokens = float(setting[0]), int(setting[1]), int(setting[2])
        model.load_state_dict(weights)
        return tg.evaluate_ttt(compiled, split, 0, args)

    for setting in (v.split(":") for v in a.ttt.split(",") if v):
        runs.append((f"ttt lr {setting[0]} x{setting[1]} chunk {setting[2]}", batch, lambda setting=setting: ttt(setting)))
    rows = []
    warm = split._replace(tokens=val[: 4 * args.val_batch_tokens])
    tg.evaluate(compiled, warm)  # compile, on a prefix of the split
    tg.evaluate(compiled, warm, a.stride)
    for name, width, score in runs:
        sync()
        t = time.perf_counter()
        loss, bpb = score()
        sync()
        rows.append((name, width, loss, bpb, time.perf_counter() - t))
    print(f"\n{desc}; {val.numel() - 1} val tokens, seq_len {args.eval_seq_len}")
    print(f"{'evaluator':<34} {'batch/lanes':>11} {'val_loss':>10} {'val_bpb':>10} {'seconds':>8} {'tokens/s':>10} {'62M on 8 GPUs':>14}")
    for name, width, loss, bpb, sec in rows:
        rate = (val.numel() - 1) / sec
        gpus = 1 if name.startswith("ttt") else 8  # TTT's chunks are sequential
        print(f"{name:<34} {width:>11} {loss:10.6f} {bpb:10.6f} {sec:8.2f} {rate:10.3g} {62.0e6 / (gpus * rate):13.1f}s")


if __name__ == "__main__":
    main()
