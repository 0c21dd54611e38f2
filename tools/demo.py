"""The whole pipeline on a CPU in a few minutes, from nothing but this machine's Python installation:
documentation strings of the standard library -> a SentencePiece BPE tokenizer -> shards -> a tiny Hymba
trained for a short while -> int6 export -> reload -> exact val_bpb and artifact size.

    python3 tools/demo.py [--out demo] [--seconds 120]
"""
from __future__ import annotations

import argparse
import ast
import glob
import math
import os
import re
import subprocess
import sys
import sysconfig
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
import build_shards  # noqa: E402

TINY = dict(NUM_LAYERS=2, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, SSM_DT_RANK=8, TRAIN_SEQ_LEN=256,
            TRAIN_BATCH_TOKENS=4096, GRAD_ACCUM_STEPS=1, ITERATIONS=1000, WARMUP_STEPS=2, TRAIN_LOG_EVERY=50,
            EVAL_STRIDE=128, VAL_BATCH_TOKENS=32768, MATRIX_LR=0.02, COMPILE=0)
VOCAB = 1024
MIN_STEPS = 50  # fewer and the wallclock went elsewhere (a busy CPU): the score would say nothing of the model


def stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings of the standard library's sources, read with ast (nothing imported)."""
    docs = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        if "site-packages" in path:
            continue
        try:
            with warnings.catch_warnings():  # old escape sequences in some sources
                warnings.simplefilter("ignore")
                tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc)
    return docs


def result(log: str) -> tuple[float, int]:
    """(roundtrip val_bpb, submission bytes) from the run's log; refused (SystemExit) if the model did not learn."""
    steps = int(re.search(r"^training: (\d+) steps", log, re.M).group(1))
    final = re.search(r"^final_int8_zlib_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", log, re.M)
    loss, bpb = map(float, final.groups())
    if steps < MIN_STEPS:
        sys.exit(f"demo: no result: {steps} training steps, fewer than {MIN_STEPS} (a busy CPU?); try more --seconds")
    if not loss < math.log(VOCAB):
        sys.exit(f"demo: no result: the model did not learn: final val_loss {loss:.4f} is not below "
                 f"ln({VOCAB}) = {math.log(VOCAB):.4f}, the loss of uniform guessing")
    return bpb, int(re.search(r"^Total submission size int6: (\d+) bytes", log, re.M).group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "demo"))
    p.add_argument("--seconds", type=float, default=150, help="training wallclock cap")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data_dir, tok_prefix = os.path.join(args.out, "datasets", "docstrings_sp1024"), os.path.join(args.out, "tokenizers", "docstrings_1024_bpe")
    docs = stdlib_docstrings()
    print(f"corpus: {len(docs)} docstrings, {sum(map(len, docs)) / 1e6:.2f} MB of text", flush=True)
    if not os.path.exists(tok_prefix + ".model"):
        build_shards.train_tokenizer(docs[500:], tok_prefix, VOCAB)
    sp = build_shards.spm.SentencePieceProcessor(model_file=tok_prefix + ".model")
    stats = build_shards.build(docs, sp, data_dir, val_docs=500, shard_tokens=400_000)
    print(f"shards: {stats}", flush=True)
    env = dict(os.environ, DATA_PATH=data_dir, TOKENIZER_PATH=tok_prefix + ".model", RUN_ID="demo",
               MAX_WALLCLOCK_SECONDS=str(args.seconds), **{k: str(v) for k, v in TINY.items()})
    log = os.path.join(args.out, "logs", "demo.txt")
    if os.path.exists(log):
        os.remove(log)
    code = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py")], cwd=args.out, env=env).returncode
    if code:
        sys.exit(f"demo: no result: train_gpt.py exited with {code} (the lines above say why); log {log}")
    bpb, size = result(open(log).read())
    print(f"\ndemo done: roundtrip val_bpb {bpb:.4f}, submission {size} bytes; log {log}")


if __name__ == "__main__":
    main()
