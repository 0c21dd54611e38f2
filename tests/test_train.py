"""The script end to end on a CPU: a short run learns and scores its reloaded artifact; two gloo processes
reproduce one process with twice the accumulation; an artifact over the cap fails loudly; bad settings, bad data and
a diverging run end early with the reason, and leave no score or artifact."""
import math
import os
import re
import shutil

import build_shards
import numpy as np
import pytest

import train_gpt as tg
from helpers import TINY_ENV, run_script


def env_for(dataset, run_id, **kw):
    data, tokenizer = dataset
    return {**TINY_ENV, "DATA_PATH": data, "TOKENIZER_PATH": tokenizer, "RUN_ID": run_id, **{k: str(v) for k, v in kw.items()}}


def main_exit_code(env, cwd, monkeypatch):
    """train_gpt.main() in this process (no interpreter start-up), in cwd: the code it exits with."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as e:
        tg.main()
    return e.value.code


def test_short_run_learns_and_scores_the_reloaded_artifact(dataset, tmp_path):
    run_script(str(tmp_path), env_for(dataset, "e2e", ITERATIONS=60, EVAL_MODE="sliding", EVAL_STRIDE=64, MATRIX_LR=0.02))
    log = (tmp_path / "logs" / "e2e.txt").read_text()
    losses = [float(v) for v in re.findall(r"train_loss:(\S+)", log)]
    assert len(losses) == 60 and abs(losses[0] - math.log(1024)) < 0.1 and sum(losses[-10:]) / 10 < losses[0] - 1.5
    pre_loss, pre = map(float, re.search(r"pre_export val_loss:(\S+) val_bpb:(\S+)", log).groups())
    assert pre_loss < math.log(1024) - 1.5
    flat = float(re.search(r"final_roundtrip_flat val_loss:\S+ val_bpb:(\S+)", log).group(1))
    final = float(re.search(r"final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", log).group(1))
    sliding = float(re.search(r"final_roundtrip_sliding val_loss:\S+ val_bpb:(\S+)", log).group(1))
    # The final score is the sliding one. After 60 steps this model barely uses context, so sliding windows (more
    # context per token) need not beat flat ones here; that they score exactly is tested in test_bpb.py.
    assert abs(flat - pre) < 0.05 and final == sliding != flat and abs(sliding - flat) < 0.01
    size = int(re.search(r"Serialized model int6\+\w+: (\d+) bytes", log).group(1))
    assert size == os.path.getsize(tmp_path / "final_model.int6.ptz")
    total = int(re.search(r"Total submission size int6: (\d+) bytes", log).group(1))
    assert total == size + os.path.getsize(tg.__file__)
    assert "backends: scan:torch" in log and "hyperparameters: {" in log
    assert "gptq:" not in log  # no matrix of this model is large enough to calibrate: no time reserved for it


def test_partial_hybrid_learns_and_scores(dataset, tmp_path):
    """Layer 0 attention only, layer 1 hybrid: compiled training, export and TTT with both kinds of mixer."""
    run_script(str(tmp_path), env_for(dataset, "part", ITERATIONS=40, SSM_LAYERS="1", MATRIX_LR=0.02, COMPILE=1,
                                      TTT_EPOCHS=1, TTT_CHUNK_TOKENS=4096))
    log = (tmp_path / "logs" / "part.txt").read_text()
    losses = [float(v) for v in re.findall(r"train_loss:(\S+)", log)]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < losses[0] - 1.0
    flat, ttt = (float(re.search(rf"^{k} val_loss:\S+ val_bpb:(\S+)", log, re.M).group(1))
                 for k in ("final_roundtrip_flat", "final_roundtrip_flat_ttt"))
    assert math.isfinite(flat) and ttt != flat and '"ssm_layers": [1]' in log


def log_values(path):
    text = open(path).read()
    return [float(v) for v in re.findall(r"train_loss:(\S+)", text)], \
        [float(v) for v in re.findall(r"(?:pre_export|final_roundtrip_flat|final_roundtrip_flat_ttt) val_loss:(\S+)", text)]


def test_two_processes_match_one_with_twice_the_accumulation(dataset, tmp_path):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    # wide enough for quantized block matrices, so that the export's GPTQ sums Hessians over both ranks' batches;
    # test-time training averages both ranks' gradients
    wide = dict(ITERATIONS=6, MODEL_DIM=256, GPTQ_CALIB_TOKENS=4096, MLP_BITS=5, TTT_EPOCHS=1, TTT_CHUNK_TOKENS=2048, TTT_LR=0.01)
    run_script(str(tmp_path / "one"), env_for(dataset, "one", GRAD_ACCUM_STEPS=2, **wide))
    run_script(str(tmp_path / "two"), env_for(dataset, "two", GRAD_ACCUM_STEPS=1, **wide), nproc=2)
    (loss1, val1), (loss2, val2) = log_values(tmp_path / "one/logs/one.txt"), log_values(tmp_path / "two/logs/two.txt")
    assert len(loss1) == len(loss2) == 6 and len(val1) == len(val2) == 3
    assert max(abs(a - b) for a, b in zip(loss1 + val1, loss2 + val2)) <= 2e-4
    log1, log2 = open(tmp_path / "one/logs/one.txt").read(), open(tmp_path / "two/logs/two.txt").read()
    assert "world_size:2 grad_accum_steps:1" in log2 and "(the same bytes on all 2 ranks)" in log2
    assert abs(val1[2] - val1[1]) > 1e-3  # the test-time training moved the score, and it is the final one
    assert float(re.search(r"final_int8_zlib_roundtrip_exact val_loss:(\S+)", log1).group(1)) == val1[2]
    for log in (log1, log2):
        assert "gptq: Hessians of 10 matrices from 4096 training tokens" in log and "Serialized model int6/int5+" in log
    # The same GPTQ result up to the rounding flips of slightly different weights (under 0.6 % of the entries
    # here; 20-27 % when the two ranks' Hessians are not summed).
    one, two = (tg.deserialize((tmp_path / d / "final_model.int6.ptz").read_bytes()) for d in ("one", "two"))
    for name, t in one.items():
        if tg.export_kind(name, t) in ("mixer", "mlp"):
            assert (t != two[name]).float().mean() < 0.02, name


def test_over_the_cap_exits_non_zero(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "SIZE_CAP_BYTES", 1000)
    assert main_exit_code(env_for(dataset, "cap", ITERATIONS=1, WARMUP_STEPS=0), tmp_path, monkeypatch) == 3
    log = (tmp_path / "logs" / "cap.txt").read_text()
    assert re.search(r"ERROR: submission is \d+ bytes over the 1000-byte cap", log)
    assert "final_int8_zlib_roundtrip_exact" in log  # the score is still reported


def test_stateful_scoring_end_to_end(dataset, tmp_path):
    run_script(str(tmp_path), env_for(dataset, "stateful", ITERATIONS=30, EVAL_MODE="stateful", TTT_EPOCHS=0, MATRIX_LR=0.02))
    log = (tmp_path / "logs" / "stateful.txt").read_text()
    flat = float(re.search(r"final_roundtrip_flat val_loss:\S+ val_bpb:(\S+)", log).group(1))
    stateful = float(re.search(r"final_roundtrip_stateful val_loss:\S+ val_bpb:(\S+)", log).group(1))
    final = float(re.search(r"final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", log).group(1))
    assert final == stateful and abs(stateful - flat) < 0.1


@pytest.mark.parametrize("env,world,message", [
    ({"NUM_LAYERS": "abc"}, 1, "NUM_LAYERS='abc' is not a valid int"),
    ({"MATRIX_LR": "fast"}, 1, "MATRIX_LR='fast' is not a valid float"),
    ({"SSM_LAYERS": "0,x"}, 1, "SSM_LAYERS='0,x' is not a valid int_list"),
    ({"ITERATIONS": "0"}, 1, "ITERATIONS=0 must be positive"),
    ({}, 3, "WORLD_SIZE=3 does not divide 8; set GRAD_ACCUM_STEPS"),
    ({"TRAIN_BATCH_TOKENS": "3000"}, 1, "TRAIN_BATCH_TOKENS=3000 must split into 1 ranks x 8 micro-steps"),
    ({"EVAL_MODE": "best"}, 1, "EVAL_MODE=best: expected flat, sliding or stateful"),
    ({"EVAL_MODE": "sliding", "EVAL_STRIDE": "0"}, 1, "EVAL_STRIDE=0 must be between 0 and EVAL_SEQ_LEN=128"),
    ({"EVAL_MODE": "stateful", "TTT_EPOCHS": "1"}, 1, "TTT_EPOCHS=1 scores flat or sliding windows"),
    ({"TTT_EPOCHS": "1", "TTT_CHUNK_TOKENS": "1000"}, 1, "TTT_CHUNK_TOKENS=1000 must be a positive multiple"),
    ({"MIXER_BITS": "9"}, 1, "MIXER_BITS=9 and MLP_BITS=6 must be between 2 and 8"),
    ({"ARTIFACT_PATH": "missing/model.ptz"}, 1, "ARTIFACT_PATH='missing/model.ptz': cannot write a file in missing"),
    ({"RUN_ID": "done"}, 1, "RUN_ID='done': logs/done.txt exists and a log holds one run; choose another RUN_ID"),
])
def test_bad_settings_are_refused_naming_the_variable_and_its_value(tmp_path, monkeypatch, env, world, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "done.txt").write_text("code: a finished run\n")
    tg.Hyperparameters({**TINY_ENV, "RUN_ID": "new"}).check()  # the settings changed below pass
    with pytest.raises(ValueError) as e:
        tg.Hyperparameters({**TINY_ENV, "RUN_ID": "new", **env}).check(world)
    assert message in str(e.value)


def test_the_script_refuses_before_anything_runs(dataset, tmp_path):
    result = run_script(str(tmp_path), env_for(dataset, "bad", NUM_LAYERS="abc"), check=False)
    assert result.returncode == 1 and "NUM_LAYERS='abc' is not a valid int" in result.stderr
    assert not os.listdir(tmp_path)  # no log, no artifact


@pytest.mark.parametrize("damage,message", [
    (lambda p: os.truncate(p, 1100), "header says 3000 tokens (7024 bytes), file has 1100 bytes"),
    (lambda p: build_shards.write_shard(p, np.array([1, 2, 1024, 3])), "token id 1024 >= VOCAB_SIZE=1024"),
])
def test_every_train_shard_is_checked_before_training(dataset, tmp_path, monkeypatch, damage, message):
    """A bad second shard is refused before the first step, although one step reads only the first shard."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        shutil.copy(os.path.join(dataset[0], name), data)
    second = str(data / "fineweb_train_000001.bin")
    build_shards.write_shard(second, np.arange(3000))
    damage(second)
    with pytest.raises(ValueError) as e:
        main_exit_code({**env_for(dataset, "shards", ITERATIONS=1), "DATA_PATH": str(data)}, tmp_path, monkeypatch)
    assert second in str(e.value) and message in str(e.value)
    assert not (tmp_path / "logs").exists()


def test_diverging_training_stops_at_once(dataset, tmp_path, monkeypatch):
    lrs = {k: "1e6" for k in ("MATRIX_LR", "SCALAR_LR", "TIED_EMBED_LR", "SSM_LR")}
    assert main_exit_code(env_for(dataset, "nan", ITERATIONS=20, TTT_EPOCHS=0, **lrs), tmp_path, monkeypatch) == 1
    log = (tmp_path / "logs" / "nan.txt").read_text()
    assert log.splitlines()[-1] == ("ERROR: train_loss at step 2 is not finite: training diverged, most likely from "
                                    "learning rates too high (MATRIX_LR=1000000.0 SCALAR_LR=1000000.0 "
                                    "TIED_EMBED_LR=1000000.0 SSM_LR=1000000.0); no artifact written")
    assert "val_bpb" not in log and os.listdir(tmp_path) == ["logs"]


@pytest.mark.parametrize("bad_call", [1, 2])  # the pre-export score; the reloaded artifact's
def test_a_score_that_is_not_finite_ends_the_run(dataset, tmp_path, monkeypatch, bad_call):
    calls = []

    def evaluate(*a, **kw):
        calls.append(1)
        return (math.nan, math.nan) if len(calls) == bad_call else tg_evaluate(*a, **kw)

    tg_evaluate = tg.evaluate
    monkeypatch.setattr(tg, "evaluate", evaluate)
    assert main_exit_code(env_for(dataset, "score", ITERATIONS=1, TTT_EPOCHS=0), tmp_path, monkeypatch) == 1
    last = (tmp_path / "logs" / "score.txt").read_text().splitlines()[-1]
    assert last == ("ERROR: the EMA weights' pre-export val_loss is nan, not finite; no artifact written"
                    if bad_call == 1 else
                    "ERROR: the reloaded artifact's flat val_loss is nan, not finite; the artifact is removed")
    assert os.listdir(tmp_path) == ["logs"]


def test_training_ends_early_enough_for_the_gptq_calibration(dataset, tmp_path):
    """The calibration's time is measured before training and reserved inside MAX_WALLCLOCK_SECONDS: with a
    reserve larger than the budget, training stops after its first step."""
    run_script(str(tmp_path), env_for(dataset, "reserve", MODEL_DIM=256, ITERATIONS=1000, MAX_WALLCLOCK_SECONDS=1,
                                      GRAD_ACCUM_STEPS=1, GPTQ_CALIB_TOKENS=2048 * 80))
    log = (tmp_path / "logs" / "reserve.txt").read_text()
    reserved = float(re.search(r"gptq: 80 calibration batches after training, (\d+)ms of the training time reserved", log).group(1))
    assert reserved > 1000 and "training: 1 steps" in log
    assert "gptq: Hessians of 10 matrices from 163840 training tokens" in log and "WARNING: training + calibration exceeded" in log
