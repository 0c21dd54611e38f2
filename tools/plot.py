"""val_bpb and train loss of several runs against step and against training wallclock, from train_gpt.py logs.

    python3 tools/plot.py logs/*.txt --out curves.png
"""
from __future__ import annotations

import argparse
import os
import re


def curves(path: str) -> dict:
    text = open(path, encoding="utf-8").read()
    train = [(int(s), float(l), float(ms) / 1000) for s, l, ms in
             re.findall(r"^step:(\d+)/\d+ train_loss:(\S+) train_time:(\d+)ms", text, re.M)]
    time_at = {s: t for s, _, t in train}
    val = [(int(s), float(b), time_at.get(int(s))) for s, b in re.findall(r"^step:(\d+)/\d+ val_loss:\S+ val_bpb:(\S+)", text, re.M)]
    final = re.search(r"^final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", text, re.M)
    return {"name": os.path.splitext(os.path.basename(path))[0], "train": train, "val": val,
            "final": float(final.group(1)) if final else None}


def plot(paths: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    runs = [curves(p) for p in paths]
    settled = [loss for run in runs for step, loss, _ in run["train"] if step > 10]  # skip the first steps' spikes
    for run in runs:
        label = run["name"] + (f" (final {run['final']:.4f})" if run["final"] is not None else "")
        for col, x in enumerate((0, 2)):  # against step, against seconds
            if run["train"]:
                axes[0, col].plot([r[x] for r in run["train"]], [r[1] for r in run["train"]], label=label, lw=1)
            points = [(v[x], v[1]) for v in run["val"] if v[x] is not None]
            if points:
                axes[1, col].plot(*zip(*points), marker="o", label=label)
    for col, xlabel in enumerate(("step", "training time (s)")):
        axes[0, col].set(xlabel=xlabel, ylabel="train loss (nats)")
        if settled:
            axes[0, col].set_ylim(min(settled) - 0.1, max(settled) + 0.2)
        axes[1, col].set(xlabel=xlabel, ylabel="val_bpb (live weights)")
        for row in (0, 1):
            axes[row, col].grid(alpha=0.3)
            axes[row, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("--out", default="curves.png")
    a = p.parse_args(argv)
    plot(a.logs, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
