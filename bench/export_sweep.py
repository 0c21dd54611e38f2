"""Bytes against roundtrip val_bpb for export variants of one trained model.

    python3 bench/export_sweep.py [--variants gptq:6/6,round:6/6,gptq:6/5,gptq:6/6/8,...]
Runs train_gpt.py's main() with the settings in the environment (e.g. the P1 command's): it trains, exports and
scores as usual. Then the same EMA weights are exported again under each variant,
METHOD:MIXER_BITS/MLP_BITS[/EMBED_BITS] (METHOD: gptq, with that run's Hessians, or round; the MIXER_BITS and
MLP_BITS of the script; EMBED_BITS for the token and value embedding tables, 16 for fp16 as in the script or 2..8
bits per row, rounded; the other fp16 tensors as in the script), read back and scored with flat windows. One row
per variant: compressed model bytes, code + model bytes, flat val_bpb, export seconds. No size cap is applied.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

DEFAULT_VARIANTS = "gptq:6/6,round:6/6,round:6/5,gptq:6/5,gptq:5/5,gptq:6/4"


def parse_variant(spec: str) -> tuple[str, int, int, int]:
    method, _, bits = spec.partition(":")
    parts = bits.split("/")
    widths = [int(b) for b in parts] if all(b.isdigit() for b in parts) else []
    if len(widths) == 2:
        widths.append(16)
    if (method not in ("gptq", "round") or len(widths) != 3 or not all(2 <= b <= 8 for b in widths[:2])
            or widths[2] not in (*range(2, 9), 16)):
        raise ValueError(f"bad variant {spec!r}: expected gptq|round:BITS/BITS[/EMBED_BITS], 2..8 bits (embedding: or 16)")
    return method, *widths


def embed_kind(export_kind):
    """train_gpt's export_kind with the embedding tables quantized per row (kind "embed") instead of kept at fp16."""
    return lambda name, t: "embed" if name in tg.EMBED_TABLES else export_kind(name, t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    variants = [parse_variant(v) for v in p.parse_args().variants.split(",")]
    captured = {}
    serialize, compile_, GPT = tg.serialize, torch.compile, tg.GPT

    def capture_serialize(state, bits, max_bytes=None, hessians=None):
        captured.setdefault("export", ({k: v.detach().clone() for k, v in state.items()}, hessians))
        return serialize(state, bits, max_bytes, hessians)

    class CapturedGPT(GPT):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            captured.setdefault("model", self)

    def capture_compile(model, **kw):
        return captured.setdefault("compiled", compile_(model, **kw))

    tg.serialize, tg.GPT, torch.compile = capture_serialize, CapturedGPT, capture_compile
    try:
        tg.main()
    except SystemExit as e:  # over the cap: the script still scored; the sweep goes on
        print(f"train_gpt.main exited with {e.code}")
    finally:
        tg.serialize, tg.GPT, torch.compile = serialize, GPT, compile_

    args = tg.Hyperparameters()
    model = captured["model"]
    scorer = captured.get("compiled", model)
    device = next(model.parameters()).device
    luts = tg.byte_luts(tg.load_tokenizer(args.tokenizer_path, args.vocab_size), device)
    val = tg.load_validation_tokens(args.val_files, args.vocab_size, args.eval_seq_len)
    batch = max(1, args.val_batch_tokens // args.eval_seq_len)
    state, hessians = captured["export"]
    code_bytes = os.path.getsize(tg.__file__)
    rows = []
    export_kind = tg.export_kind
    for method, mixer_bits, mlp_bits, embed_bits in variants:
        t = time.perf_counter()
        tg.export_kind = export_kind if embed_bits == 16 else embed_kind(export_kind)
        try:
            blob, _ = tg.serialize(state, {"embed": embed_bits, "mixer": mixer_bits, "mlp": mlp_bits}, None,
                                   hessians if method == "gptq" else None)
        finally:
            tg.export_kind = export_kind
        seconds = time.perf_counter() - t
        model.load_state_dict(tg.deserialize(blob))
        _, bpb = tg.evaluate(scorer, tg.ValSplit(val, luts, args.eval_seq_len, batch))
        name = f"{method}:{mixer_bits}/{mlp_bits}" + (f"/{embed_bits}" if embed_bits != 16 else "")
        rows.append((name, len(blob), len(blob) + code_bytes, bpb, seconds))
        print(f"sweep {rows[-1][0]} model_bytes:{rows[-1][1]} total_bytes:{rows[-1][2]} val_bpb:{bpb:.6f} export_s:{seconds:.1f}", flush=True)
    print("\n| variant (method:mixer/MLP[/embedding] bits) | model bytes | code + model | flat val_bpb | export s |\n|---|---|---|---|---|")
    for name, model_bytes, total, bpb, seconds in rows:
        print(f"| {name} | {model_bytes:,} | {total:,} | {bpb:.5f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
