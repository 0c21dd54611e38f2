"""Shard format, loader and the clear errors for bad input."""
import glob
import os

import numpy as np
import pytest

import build_shards
import train_gpt as tg


def shard(tmp_path, tokens, name="fineweb_train_000000.bin"):
    path = str(tmp_path / name)
    build_shards.write_shard(path, tokens)
    return path


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1024, 5001)
    path = shard(tmp_path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * 5001
    assert np.array_equal(tg.load_shard(path, 1024), tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 5001] and not header[3:].any()


def corrupt(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], dtype="<i4").tobytes())


@pytest.mark.parametrize("damage,message", [
    (lambda p: corrupt(p, 0, 12345), "bad magic 12345"),
    (lambda p: corrupt(p, 4, 2), "unsupported shard version 2"),
    (lambda p: open(p, "ab").write(b"\0\0"), "header says 100 tokens (1224 bytes), file has 1226 bytes"),
    (lambda p: os.truncate(p, 1100), "header says 100 tokens (1224 bytes), file has 1100 bytes"),
    (lambda p: os.truncate(p, 10), "shorter than the 1024-byte header"),
])
def test_bad_shards_name_the_file_and_the_problem(tmp_path, damage, message):
    path = shard(tmp_path, np.arange(100))
    damage(path)
    with pytest.raises(ValueError) as e:
        tg.load_shard(path, 1024)
    assert path in str(e.value) and message in str(e.value)


def test_token_out_of_vocabulary(tmp_path):
    path = shard(tmp_path, [1, 5, 1024, 7])
    with pytest.raises(ValueError, match="token id 1024 >= VOCAB_SIZE=1024"):
        tg.load_shard(path, 1024)
    assert len(tg.load_shard(path, 2048)) == 4


def test_validation_split_must_hold_one_window(tmp_path):
    shard(tmp_path, np.arange(100), "fineweb_val_000000.bin")
    pattern = str(tmp_path / "fineweb_val_*.bin")
    with pytest.raises(ValueError, match=r"100 validation tokens, fewer than one window of EVAL_SEQ_LEN \+ 1 = 129"):
        tg.load_validation_tokens(pattern, 1024, 128)
    assert len(tg.load_validation_tokens(pattern, 1024, 99)) == 100


def test_no_shards_match(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards match .*nothing_\\*.bin"):
        tg.shard_paths(str(tmp_path / "nothing_*.bin"))


def test_tokenizer_vocab_mismatch(dataset):
    _, tokenizer = dataset
    assert tg.load_tokenizer(tokenizer, 1024).get_piece_size() == 1024
    with pytest.raises(ValueError, match="has 1024 pieces but VOCAB_SIZE=8192"):
        tg.load_tokenizer(tokenizer, 8192)
    with pytest.raises(FileNotFoundError, match="not found"):
        tg.load_tokenizer(tokenizer + ".missing", 1024)


def test_loader_ranks_see_one_stream(tmp_path):
    """World 2 ranks' slices of a step == the world-1 loader's two consecutive micro-batches, across shard ends."""
    rng = np.random.default_rng(1)
    for i, n in enumerate((700, 300, 900)):
        shard(tmp_path, rng.integers(0, 1024, n), f"fineweb_train_{i:06d}.bin")
    pattern = str(tmp_path / "fineweb_train_*.bin")
    single = tg.TokenLoader(pattern, 1024, rank=0, world=1)
    ranks = [tg.TokenLoader(pattern, 1024, rank=r, world=2) for r in range(2)]
    for _ in range(5):  # 5 steps x 2 x 129 tokens wraps around the 1,900-token stream
        expected = [single.next_batch(128, 64, "cpu") for _ in range(2)]
        for r, loader in enumerate(ranks):
            x, y = loader.next_batch(128, 64, "cpu")
            assert x.shape == (2, 64) and (x == expected[r][0]).all() and (y == expected[r][1]).all()
            assert (x.flatten()[1:] == y.flatten()[:-1]).all()


def test_build_shards_layout(tmp_path, dataset):
    _, tokenizer = dataset
    sp = build_shards.spm.SentencePieceProcessor(model_file=tokenizer)
    docs = ["First document, with some words.", "Second one: 12345 digits.", "Third\nwith a newline."] * 50
    stats = build_shards.build(docs, sp, str(tmp_path / "out"), val_docs=3, shard_tokens=500)
    val = tg.load_shard(str(tmp_path / "out" / "fineweb_val_000000.bin"), 1024)
    assert list(val) == [t for d in docs[:3] for t in [1] + sp.encode(d)]
    train = np.concatenate([tg.load_shard(p, 1024) for p in sorted(glob.glob(str(tmp_path / "out" / "fineweb_train_*.bin")))])
    assert list(train) == [t for d in docs[3:] for t in [1] + sp.encode(d)]
    assert stats["train_shards"] == len(glob.glob(str(tmp_path / "out" / "fineweb_train_*.bin"))) > 1
    with pytest.raises(ValueError, match="must leave documents"):
        build_shards.build(docs[:3], sp, str(tmp_path / "x"), val_docs=3, shard_tokens=500)
