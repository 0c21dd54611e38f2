"""Download the challenge's FineWeb shards and tokenizer from the Hugging Face hub into this folder.

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10

Files land in data/datasets/fineweb10B_<variant>/ and data/tokenizers/, where train_gpt.py's defaults look.
The hub's manifest.json says how many shards exist. Interrupted downloads resume from their .part file; every
shard's header, size and token range are checked; files already present and valid are not fetched again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from train_gpt import load_shard  # noqa: E402

HUB = "https://huggingface.co/datasets/willdepueoai/parameter-golf/resolve/main"
ROOT_PREFIX = "matched_100B_train30Btok_even_seed1337"
VARIANTS = {"sp1024": ("fineweb10B_sp1024", 1024), "sp8192": ("fineweb10B_sp8192", 8192)}


def fetch(url: str, dest: str) -> None:
    """Download url to dest through dest.part, resuming with an HTTP range request where the server allows."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have and url.startswith("http") else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
        resumed = have and getattr(response, "status", None) == 206
        with open(part, "ab" if resumed else "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    os.replace(part, dest)


def get_shard(url: str, dest: str, vocab_size: int) -> str:
    """Fetch a shard unless a valid copy is there; a shard that fails its checks is removed and reported."""
    if os.path.exists(dest):
        try:
            load_shard(dest, vocab_size)
            return "kept"
        except ValueError:
            os.remove(dest)
    fetch(url, dest)
    try:
        load_shard(dest, vocab_size)
    except ValueError as e:
        os.remove(dest)
        raise ValueError(f"downloaded shard is invalid ({e}); removed, run again to retry") from None
    return "fetched"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024")
    p.add_argument("--train-shards", type=int, default=1, help="how many training shards (from the first)")
    p.add_argument("--base-url", default=HUB, help="where the hub's files are (a file:// URL works too)")
    p.add_argument("--data-dir", default=HERE, help="where datasets/ and tokenizers/ go")
    args = p.parse_args(argv)
    dataset, vocab_size = VARIANTS[args.variant]
    remote = f"{args.base_url.rstrip('/')}/{ROOT_PREFIX}"
    manifest_path = os.path.join(args.data_dir, "manifest.json")
    fetch(f"{remote}/manifest.json", manifest_path)
    manifest = json.load(open(manifest_path))
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset), None)
    if entry is None:
        raise SystemExit(f"{dataset} is not in the hub's manifest.json")
    n_train, n_val = int(entry["stats"]["files_train"]), int(entry["stats"]["files_val"])
    if not 0 <= args.train_shards <= n_train:
        raise SystemExit(f"--train-shards {args.train_shards}: {dataset} has {n_train} training shards")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer is None:
        raise SystemExit(f"tokenizer {entry.get('tokenizer_name')} of {dataset} is not in the manifest")
    out = os.path.join(args.data_dir, "datasets", dataset)
    names = [f"fineweb_val_{i:06d}.bin" for i in range(n_val)] + [f"fineweb_train_{i:06d}.bin" for i in range(args.train_shards)]
    for name in names:
        status = get_shard(f"{remote}/datasets/{dataset}/{name}", os.path.join(out, name), vocab_size)
        print(f"{status}: {os.path.join(out, name)}", flush=True)
    for key in ("model_path", "vocab_path"):
        if tokenizer.get(key):
            dest = os.path.join(args.data_dir, "tokenizers", os.path.basename(tokenizer[key]))
            if not os.path.exists(dest):
                fetch(f"{remote}/{tokenizer[key]}", dest)
            print(f"tokenizer: {dest}")


if __name__ == "__main__":
    main()
