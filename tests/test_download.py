"""data/cached_challenge_fineweb.py against a local stand-in of the hub's layout (the hub itself is unreachable here)."""
import json
import shutil

import numpy as np
import pytest

import build_shards
import cached_challenge_fineweb as dl


@pytest.fixture
def hub(tmp_path):
    root = tmp_path / "hub" / dl.ROOT_PREFIX
    shards = root / "datasets" / "fineweb10B_sp1024"
    shards.mkdir(parents=True)
    rng = np.random.default_rng(0)
    build_shards.write_shard(str(shards / "fineweb_val_000000.bin"), rng.integers(0, 1024, 1000))
    for i in range(3):
        build_shards.write_shard(str(shards / f"fineweb_train_{i:06d}.bin"), rng.integers(0, 1024, 2000 + i))
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model bytes")
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp1024", "stats": {"files_train": 3, "files_val": 1}}],
                "tokenizers": [{"name": "sp1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "hub", shards


def test_download_resume_and_skip(hub, tmp_path, capsys):
    base, shards = hub
    out = tmp_path / "data"
    dest = out / "datasets" / "fineweb10B_sp1024"
    dest.mkdir(parents=True)
    (dest / "fineweb_train_000000.bin.part").write_bytes(b"\x01" * 100)  # an interrupted earlier download
    args = ["--train-shards", "2", "--base-url", base.as_uri(), "--data-dir", str(out)]
    dl.main(args)
    for name in ("fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"):
        assert (dest / name).read_bytes() == (shards / name).read_bytes()
    assert not (dest / "fineweb_train_000002.bin").exists() and not list(dest.glob("*.part"))
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model bytes"
    capsys.readouterr()
    dl.main(args)
    assert capsys.readouterr().out.count("kept:") == 3


def test_download_rejects_bad_requests_and_bad_shards(hub, tmp_path):
    base, shards = hub
    args = ["--base-url", base.as_uri(), "--data-dir", str(tmp_path / "data")]
    with pytest.raises(SystemExit, match="has 3 training shards"):
        dl.main(args + ["--train-shards", "4"])
    with open(shards / "fineweb_train_000000.bin", "ab") as f:
        f.write(b"extra")
    with pytest.raises(ValueError, match="downloaded shard is invalid .*file has"):
        dl.main(args + ["--train-shards", "1"])
    assert not (tmp_path / "data" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").exists()
    shutil.rmtree(shards)
    with pytest.raises(OSError):
        dl.main(args + ["--train-shards", "1"])
