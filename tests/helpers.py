"""Shared test helpers: a tokenizer, a small corpus and shards, and a way to run the script."""
import os
import subprocess
import sys

import build_shards
import sentencepiece as spm
import torch

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
OFFICIAL_TOKENIZER = os.path.join(SHARED, "tokenizers", "fineweb_1024_bpe.model")

# The one tiny model of the CPU tests: the script runs it from these settings (TINY_ENV) and the in-process tests
# build it from the same ones (small_args). Two layers, both hybrid (the design's every-block Hymba).
TINY_MODEL = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", SSM_DT_RANK="8",
                  SSM_LAYERS="0,1")
# GPTQ's calibration reads 16 micro-batches instead of the default 2,048 (the tiny model's matrices are all under
# GPTQ's size, so those forwards found nothing to calibrate; tests of GPTQ set their own)
TINY_ENV = dict(TINY_MODEL, TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="2048", WARMUP_STEPS="1", TRAIN_LOG_EVERY="1",
                EVAL_MODE="flat", VAL_BATCH_TOKENS="8192", COMPILE="0", MAX_WALLCLOCK_SECONDS="0", GPTQ_CALIB_TOKENS="4096")


def small_args(**kw):
    """The script's settings for the tiny model (TINY_MODEL), kw overriding them as the environment would, so that
    derived defaults follow (SSM_INNER is MODEL_DIM / 2). A test that changes NUM_LAYERS names its SSM_LAYERS."""
    env = {k.upper(): ",".join(map(str, v)) if isinstance(v, (list, tuple, range)) else str(v) for k, v in kw.items()}
    return tg.Hyperparameters({**TINY_MODEL, **env})


def unzero_output_projections(model, std):
    """Random weights for every projection that is zero at init (the mixers' and MLPs' outputs, any extra input
    path), so that everything reaches the logits and the gradients."""
    for m in model.modules():
        if isinstance(m, tg.CastedLinear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=std)


def corpus():
    from demo import stdlib_docstrings

    return stdlib_docstrings()


def make_dataset(tmp, docs=None, tokenizer=None, val_docs=200, shard_tokens=60_000):
    """Shards of stdlib docstrings under tmp/data with the official tokenizer when present, else one trained here."""
    docs = docs or corpus()
    if tokenizer is None:
        tokenizer = OFFICIAL_TOKENIZER if os.path.exists(OFFICIAL_TOKENIZER) else \
            build_shards.train_tokenizer(docs[val_docs:], os.path.join(tmp, "tok", "sp1024"), 1024)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    data = os.path.join(tmp, "data")
    build_shards.build(docs[:3000], sp, data, val_docs=val_docs, shard_tokens=shard_tokens)
    return data, tokenizer


def run_script(cwd, env, nproc=1, check=True):
    env = {**os.environ, **env}
    env.pop("RANK", None)
    script = os.path.join(ROOT, "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
