"""Text documents -> token shards in the challenge's format, with a SentencePiece model (or one trained here).

    python3 data/build_shards.py --docs docs.jsonl[.xz] --tokenizer fineweb_1024_bpe.model --out data/datasets/mine
    python3 data/build_shards.py --docs docs.txt --train-tokenizer data/tokenizers/mine --vocab-size 1024 --out ...

Documents: a .jsonl file with one {"text": ...} object per line, or plain text with documents separated by
blank lines (either may be .xz/.gz compressed). Each document becomes [BOS] + tokens; the first --val-docs
documents go to fineweb_val_000000.bin, the rest to fineweb_train_NNNNNN.bin shards.
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os

import numpy as np
import sentencepiece as spm

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1


def write_shard(path: str, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_docs(path: str):
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if ".jsonl" in path:
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]
        else:
            for doc in f.read().split("\n\n"):
                if doc.strip():
                    yield doc


def train_tokenizer(docs, prefix: str, vocab_size: int) -> str:
    """A SentencePiece BPE with the challenge tokenizer's settings; returns the .model path."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.9995, max_sentence_length=1 << 16,
        minloglevel=2)
    return prefix + ".model"


def build(docs: list[str], sp: spm.SentencePieceProcessor, out_dir: str, val_docs: int, shard_tokens: int) -> dict:
    if sp.bos_id() != BOS_ID:
        raise ValueError(f"tokenizer BOS id is {sp.bos_id()}, the format expects {BOS_ID}")
    if not 0 < val_docs < len(docs):
        raise ValueError(f"--val-docs {val_docs} must leave documents for both splits ({len(docs)} in all)")
    os.makedirs(out_dir, exist_ok=True)
    stats = {"val_tokens": 0, "train_tokens": 0, "train_shards": 0}
    val = np.concatenate([[BOS_ID] + ids for ids in sp.encode(docs[:val_docs])])
    write_shard(os.path.join(out_dir, "fineweb_val_000000.bin"), val)
    stats["val_tokens"] = int(val.size)
    buf: list[int] = []

    def flush():
        write_shard(os.path.join(out_dir, f"fineweb_train_{stats['train_shards']:06d}.bin"), buf[:shard_tokens])
        stats["train_tokens"] += min(len(buf), shard_tokens)
        stats["train_shards"] += 1
        del buf[:shard_tokens]

    for start in range(val_docs, len(docs), 1000):
        for ids in sp.encode(docs[start : start + 1000]):
            buf += [BOS_ID] + ids
        while len(buf) >= shard_tokens:
            flush()
    if buf:
        flush()
    return stats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", required=True, nargs="+", help="jsonl or text files of documents")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--tokenizer", help="an existing SentencePiece .model")
    p.add_argument("--train-tokenizer", metavar="PREFIX", help="train a BPE tokenizer to PREFIX.model instead")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--val-docs", type=int, default=1000, help="documents held out for validation (the first ones)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    args = p.parse_args()
    if bool(args.tokenizer) == bool(args.train_tokenizer):
        p.error("give exactly one of --tokenizer and --train-tokenizer")
    docs = [d for path in args.docs for d in read_docs(path)]
    model = args.tokenizer or train_tokenizer(docs[args.val_docs :], args.train_tokenizer, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=model)
    stats = build(docs, sp, args.out, args.val_docs, args.shard_tokens)
    print(json.dumps({"tokenizer": model, "vocab_size": sp.get_piece_size(), "docs": len(docs), **stats}))


if __name__ == "__main__":
    main()
