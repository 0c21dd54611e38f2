"""Where an artifact's bytes go: per export kind, the parameters, the bytes lzma gives them (each kind compressed
alone, with the script's settings), and the order-0 entropy of the quantized values (the bytes an ideal coder of
each matrix's own histogram would need), so that the lzma overhead and the values' own entropy separate.

    python3 bench/artifact_bytes.py final_model.int6.ptz [...]
    python3 bench/artifact_bytes.py --synthetic [--bits 6 5]  # rows of Gaussian, Laplace and Student-t(4) weights
"""
import argparse
import lzma
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def entropy_bytes(values: np.ndarray) -> float:
    counts = np.unique(values, return_counts=True)[1]
    p = counts / values.size
    return float(-(counts * np.log2(p)).sum() / 8)


def report(label: str, tensors) -> None:
    kinds = {}
    for _, kind, _, values, scales in tensors:
        k = kinds.setdefault(kind, dict(params=0, raw=[], entropy=0.0))
        k["params"] += values.size
        k["raw"] += [values.tobytes()] + ([scales.tobytes()] if scales is not None else [])
        k["entropy"] += 2 * values.size if kind == "fp16" else entropy_bytes(values) + 2 * scales.size
    print(f"{label}\n{'kind':8} {'params':>11} {'lzma bytes':>11} {'B/param':>8} {'entropy B/param':>16} "
          f"{'lzma/entropy':>13}")
    for kind, k in sorted(kinds.items()):
        packed = len(tg.compress(b"".join(k["raw"])))
        print(f"{kind:8} {k['params']:11,} {packed:11,} {packed / k['params']:8.4f} "
              f"{k['entropy'] / k['params']:16.4f} {packed / k['entropy']:13.4f}")


def synthetic(bits: int, rows: int = 512, cols: int = 1536, matrices: int = 8, seed: int = 0):
    """Matrices quantized to `bits` by the script's per-row rounding (no GPTQ), rows of different scales."""
    g = torch.Generator().manual_seed(seed)
    draws = {"gaussian": lambda: torch.randn(rows, cols, generator=g),
             "laplace": lambda: torch.log1p(-torch.rand(rows, cols, generator=g)) * torch.sign(
                 torch.rand(rows, cols, generator=g) - 0.5),
             "student-t(4)": lambda: torch.randn(rows, cols, generator=g) / torch.sqrt(
                 torch.randn(rows, cols, 4, generator=g).square().mean(-1))}
    for name, draw in draws.items():
        tensors = []
        for i in range(matrices):
            w = draw() * (0.5 + torch.rand(rows, 1, generator=g))
            q, s = tg.quantize_rows(w, 2 ** (bits - 1) - 1)
            tensors.append((f"{name}.{i}", "mixer", (rows, cols), q.numpy(), s.numpy()))
        yield name, tensors


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="*")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--bits", type=int, nargs="*", default=[6], help="--synthetic's bit widths")
    a = p.parse_args()
    if not a.artifacts and not a.synthetic:
        p.error("give artifacts or --synthetic")
    for path in a.artifacts:
        with open(path, "rb") as f:
            report(f"{path}: {os.path.getsize(path):,} bytes", tg.artifact_entries(lzma.decompress(f.read())))
    for bits in a.bits if a.synthetic else []:
        for name, tensors in synthetic(bits):
            report(f"synthetic int{bits}, {name} weights", tensors)


if __name__ == "__main__":
    main()
