"""tools/summarize.py, tools/plot.py and the bench/ scripts (export sweep, artifact bytes, P1 pair, step time's
attention-only mixer)."""
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types

import pytest

import demo
import plot
import summarize
from helpers import ROOT, TINY_ENV, run_script, small_args, tg


@pytest.fixture(scope="module")
def logs(dataset, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("runs")
    data, tokenizer = dataset
    for seed in (1337, 42, 7):
        run_script(str(cwd), {**TINY_ENV, "DATA_PATH": data, "TOKENIZER_PATH": tokenizer, "RUN_ID": f"seed{seed}",
                              "SEED": str(seed), "ITERATIONS": "3", "VAL_LOSS_EVERY": "2", "TTT_EPOCHS": "3"})
    return [str(cwd / "logs" / f"seed{s}.txt") for s in (1337, 42, 7)]


def test_submission_json_from_three_seeds(logs, tmp_path):
    out = tmp_path / "submission.json"
    summarize.main(logs + ["--out", str(out), "--name", "test", "--reference", "7.5", "7.6", "7.7"])
    s = json.loads(out.read_text())
    finals = [tuple(map(float, re.search(r"final_int8_zlib_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)", open(p).read()).groups()))
              for p in logs]
    assert s["seeds"] == [1337, 42, 7] and set(s["seed_results"]) == {"1337", "42", "7"}
    assert s["val_bpb"] == pytest.approx(sum(b for _, b in finals) / 3) and s["val_loss"] == pytest.approx(sum(l for l, _ in finals) / 3)
    assert s["seed_results"]["42"]["steps"] == 3 and s["seed_results"]["42"]["val_bpb"] == finals[1][1]
    assert s["bytes_total"] == max(int(re.search(r"Total submission size \S+: (\d+)", open(p).read()).group(1)) for p in logs)
    assert s["compliance"]["three_seeds"] and s["compliance"]["artifact_under_16mb"] and s["hardware"] == "1x cpu"
    assert 0 <= s["significance"]["p_value"] <= 1 and s["val_bpb_std"] > 0
    # the runs trained on the validation split after scoring it (TTT_EPOCHS=3): the summary says so
    rule = s["compliance"]["score_first_ttt"]
    assert rule.startswith("score-first: each 32768-token chunk") and "3 epochs" in rule


def test_submission_keeps_the_score_before_ttt(logs, tmp_path):
    """Each seed's flat score (before TTT) is read from its own line, not from the TTT line after it. The tiny runs'
    validation is one TTT chunk, so both lines hold the same number: seed 42's flat line is edited apart."""
    apart = edited(logs[1], tmp_path, "apart.txt", r"^(final_roundtrip_flat val_loss:\S+ val_bpb:)\S+", r"\g<1>9.87654321")
    summarize.main([logs[0], apart, logs[2], "--out", str(tmp_path / "s.json")])
    seed42 = json.loads((tmp_path / "s.json").read_text())["seed_results"]["42"]
    final = float(re.search(r"final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", open(logs[1]).read()).group(1))
    assert seed42["val_bpb_before_ttt"] == 9.87654321 and seed42["val_bpb"] == final


def test_submission_without_ttt(logs, tmp_path):
    """Logs of runs without TTT: no before-TTT score, and the compliance entry says there was none."""
    no_ttt = [edited(p, tmp_path, f"no_ttt{i}.txt", r'"ttt_epochs": 3', '"ttt_epochs": 0') for i, p in enumerate(logs)]
    summarize.main(no_ttt + ["--out", str(tmp_path / "s.json")])
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["compliance"]["score_first_ttt"] == "no test-time training"
    assert all("val_bpb_before_ttt" not in r for r in s["seed_results"].values())


def edited(path, tmp_path, name, old, new, count=1):
    text = open(path).read()
    assert re.search(old, text, re.M), old
    out = tmp_path / name
    out.write_text(re.sub(old, new, text, count=count, flags=re.M))
    return str(out)


def test_refusals(logs, tmp_path):
    def refused(paths, message):
        with pytest.raises(SystemExit) as e:
            summarize.main(paths + ["--out", str(tmp_path / "x.json")])
        assert message in str(e.value), str(e.value)

    truncated = tmp_path / "truncated.txt"
    truncated.write_text("".join(open(logs[0]).readlines()[:-3]))
    refused([str(truncated)] + logs[1:], "truncated or not a train_gpt.py log")
    refused(logs[:2] + [edited(logs[2], tmp_path, "mixed.txt", r'"model_dim": 64', '"model_dim": 96')], "settings differ from")
    refused(logs[:2] + [edited(logs[2], tmp_path, "code.txt", r"sha256:\w+", "sha256:0123456789abcdef")], "different code")
    refused(logs[:2] + [edited(logs[2], tmp_path, "big.txt", r"Total submission size int6: \d+", "Total submission size int6: 16000001")],
            "over the 16000000-byte cap")
    refused(logs[:2] + [edited(logs[2], tmp_path, "slow.txt", r"^training: 3 steps in \d+ms", "training: 3 steps in 600500ms")],
            "trained 600.5s, over 600s")
    refused([logs[0], logs[0]], "repeated seeds")
    twice = tmp_path / "twice.txt"
    twice.write_text(open(logs[0]).read() + open(logs[0]).read())  # a RUN_ID used again, when logs were appended
    refused([str(twice)] + logs[1:], f"{twice}: 2 runs in one log")
    nan = edited(logs[2], tmp_path, "nan.txt", r"^(final_int8_zlib_roundtrip_exact) .*", r"\1 val_loss:nan val_bpb:nan")
    refused(logs[:2] + [nan], f"{nan}: a loss or score that is not finite: 'final_int8_zlib_roundtrip_exact val_loss:")


def demo_log(steps, val_loss):
    return (f"training: {steps} steps in 150000ms, step_avg:1.00ms\n"
            f"Total submission size int6: 123456 bytes (code 1 + model 2; cap 16000000)\n"
            f"final_int8_zlib_roundtrip_exact val_loss:{val_loss} val_bpb:1.5\n")


def test_demo_prints_no_result_of_a_model_that_did_not_learn():
    assert demo.result(demo_log(500, 5.0)) == (1.5, 123456)
    for log, reason in ((demo_log(1, 5.0), "1 training steps, fewer than 50"),
                        (demo_log(500, 7.5), "final val_loss 7.5000 is not below ln(1024) = 6.9315"),
                        (demo_log(500, "nan"), "final val_loss nan is not below")):
        with pytest.raises(SystemExit) as e:
            demo.result(log)
        assert str(e.value).startswith("demo: no result") and reason in str(e.value), str(e.value)


def test_the_demo_model_reserves_no_time_for_calibration():
    """None of the demo model's matrices is large enough to be calibrated: the script skips GPTQ's calibration and
    its reserve of training time (on a busy 2-core CPU it took 147 s of the demo's 150)."""
    assert tg.gptq_layers(tg.GPT(tg.Hyperparameters({k: str(v) for k, v in demo.TINY.items()}))) == {}
    assert len(tg.gptq_layers(tg.GPT(small_args(model_dim=256)))) == 10


def test_check_compares_each_logs_code_with_the_script(logs, tmp_path):
    """summarize.py --check: logs of the current train_gpt.py pass (named or in a folder); a copy whose code sha256 is
    edited fails with exit status 1, naming that log; --script changes what the logs are compared with."""
    folder = tmp_path / "logs"
    folder.mkdir()
    for p in logs:
        shutil.copy(p, folder)

    def check(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "summarize.py"), "--check", *args],
                              capture_output=True, text=True, timeout=60)

    ok = check(str(folder))
    assert ok.returncode == 0 and "ok: 3 logs ran" in ok.stdout, ok.stderr
    other = edited(logs[1], folder, "other.txt", r"^(code: .* sha256:)\w+$", r"\g<1>" + "0" * 64)
    for args in ((str(folder),), (logs[0], other)):
        bad = check(*args)
        assert bad.returncode == 1 and "check failed" in bad.stderr and "other.txt: ran code sha256:0000" in bad.stderr
        assert "seed1337.txt" not in bad.stderr  # only the edited log is named
    script = tmp_path / "train_gpt.py"
    script.write_text("print()\n")
    assert check("--script", str(script), logs[0]).returncode == 1


def test_statistics_against_hand_computed_values():
    for x in (0.1, 0.5, 0.9):
        assert summarize.incomplete_beta(1, 1, x) == pytest.approx(x, rel=1e-12)
        assert summarize.incomplete_beta(3, 1, x) == pytest.approx(x**3, rel=1e-12)
    # Welch with n = 2 and 2 and equal variances has df = 2, where P(T > t) = 1/2 - t / (2 sqrt(2 + t^2))
    t, df, p = summarize.welch_one_sided([1.0, 1.2], [1.4, 1.6], margin=0.005)
    t_hand = (1.5 - 0.005 - 1.1) / math.sqrt(0.02 / 2 + 0.02 / 2)
    assert t == pytest.approx(t_hand) and df == pytest.approx(2.0)
    assert p == pytest.approx(0.5 - t_hand / (2 * math.sqrt(2 + t_hand**2)), rel=1e-10)
    # one sample against an exact reference: df = n - 1; a worse mean gives p > 1/2
    t, df, p = summarize.welch_one_sided([1.5, 1.6, 1.7], [1.0], margin=0.005)
    assert df == pytest.approx(2.0) and t < 0 and p > 0.5


def test_plot_writes_a_png(logs, tmp_path):
    out = tmp_path / "curves.png"
    plot.main(logs + ["--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = plot.curves(logs[0])
    assert [s for s, _, _ in run["train"]] == [1, 2, 3] and [s for s, _, _ in run["val"]] == [2]


def test_export_sweep_repeats_the_scripts_own_export_and_scores_each_variant(dataset, tmp_path):
    data, tokenizer = dataset
    env = {**os.environ, **TINY_ENV, "DATA_PATH": data, "TOKENIZER_PATH": tokenizer, "RUN_ID": "sweep", "ITERATIONS": "3",
           "MODEL_DIM": "256", "GPTQ_CALIB_TOKENS": "4096"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "export_sweep.py"), "--variants", "gptq:6/6,round:6/6,gptq:5/4,gptq:6/6/8"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {m[0]: (int(m[1]), float(m[2])) for m in re.findall(r"^sweep (\S+) model_bytes:(\d+) total_bytes:\d+ val_bpb:(\S+)", out.stdout, re.M)}
    log = (tmp_path / "logs" / "sweep.txt").read_text()
    assert list(rows) == ["gptq:6/6", "round:6/6", "gptq:5/4", "gptq:6/6/8"]
    # the script's own export is GPTQ at 6 bits: the same bytes and score
    assert rows["gptq:6/6"][0] == int(re.search(r"Serialized model int6\+\w+: (\d+) bytes", log).group(1))
    assert rows["gptq:6/6"][1] == pytest.approx(float(re.search(r"final_roundtrip_flat val_loss:\S+ val_bpb:(\S+)", log).group(1)), abs=1e-6)
    assert rows["round:6/6"][0] != rows["gptq:6/6"][0] and rows["gptq:5/4"][0] < 0.9 * rows["gptq:6/6"][0]
    assert rows["gptq:6/6/8"][0] < rows["gptq:6/6"][0]  # the embedding tables at int8 instead of fp16


def bench_module(name):
    """A bench/ script imported as a module (bench/ is not a package on the path)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_sweep_variants():
    parse_variant = bench_module("export_sweep").parse_variant
    assert parse_variant("gptq:6/5") == ("gptq", 6, 5, 16) and parse_variant("round:5/4/8") == ("round", 5, 4, 8)
    for bad in ("gptq:6", "gptq:6/6/9", "svd:6/6", "gptq:6/a", "gptq:6/6/16/2", "gptq:1/6"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_p1_pair_runs_each_script_on_its_own_gpu_and_tabulates_both(tmp_path):
    """bench/p1_pair.sh with stand-in scripts that print the lines the table reads: one GPU and one folder per run,
    the pair's own settings applied over the P1 command's (SEED, TRAIN_BATCH_TOKENS and TTT_EPOCHS included), both rows in the
    table with the seed and step size each run logged, the TTT score where a run has one, and each run's artifact
    kept under its tag."""
    stub = ("import json, os\nprint('env', *(os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', 'RUN_ID', 'EXTRA', "
            "'MAX_WALLCLOCK_SECONDS', 'TTT_EPOCHS')), os.getcwd())\n"
            "print('hyperparameters: ' + json.dumps(dict(seed=int(os.environ['SEED']), "
            "train_batch_tokens=int(os.environ['TRAIN_BATCH_TOKENS'])), sort_keys=True))\n"
            "print('training: {s} steps in 239000ms, step_avg:{ms}ms peak_memory:13GiB')\n"
            "print('pre_export val_loss:2.27 val_bpb:{pre} (EMA weights)')\n"
            "print('Total submission size int6: {size} bytes (code 1 + model 2; cap 16000000)')\n"
            "print('final_roundtrip_flat val_loss:2.27 val_bpb:{bpb} eval_time:1.0s')\n{ttt}"
            "open('logs/' + os.environ['RUN_ID'] + '.txt', 'w').write('log\\n')\n"
            "open('final_model.int6.ptz', 'wb').write(os.environ['RUN_ID'].encode())\n")
    for name, vals in (("a.py", dict(s=4398, ms="54.40", pre=1.3649, size=15694627, bpb=1.36736,
                                   ttt="print('final_roundtrip_flat_ttt val_loss:2.26 val_bpb:1.36470 eval_time:9.0s')\n")),
                       ("b.py", dict(s=4309, ms="55.52", pre=1.3584, size=15900670, bpb=1.36058, ttt=""))):
        (tmp_path / name).write_text(stub.format(**vals))
    out = tmp_path / "out"
    env = {**os.environ, "DATA_PATH": str(tmp_path), "TOKENIZER_PATH": str(tmp_path / "a.py"), "OUT": str(out), "SEED": "5",
           "KEEP_ARTIFACTS": "1"}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "p1_pair.sh"),
                        f"first {tmp_path}/a.py EXTRA=x SEED=42 TRAIN_BATCH_TOKENS=65536 TTT_EPOCHS=3",
                        f"second {tmp_path}/b.py"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    first, second = ((out / f"{t}.out").read_text().split("\n")[0].split() for t in ("first", "second"))
    assert first[1:6] == ["0", "p1_first", "x", "240", "3"] and second[1:6] == ["1", "p1_second", "None", "240", "0"]
    assert first[6] != second[6] and (out / "p1_first.txt").exists() and (out / "p1_second.txt").exists()
    assert (out / "first.ptz").read_bytes() == b"p1_first" and (out / "second.ptz").read_bytes() == b"p1_second"
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("first", "second"))]
    assert rows == [["first", "42", "65536", "54.40", "4398", "1.3649", "1.36736", "1.36470", "15694627"],
                    ["second", "1337", str(tg.Hyperparameters({}).train_batch_tokens // 8), "55.52", "4309", "1.3584", "1.36058", "-", "15900670"]]


@pytest.mark.parametrize("setting", ["MAX_WALLCLOCK_SECONDS=9", "EVAL_MODE=sliding", "GRAD_ACCUM_STEPS=2"])
def test_p1_pair_refuses_settings_that_p1_fixes(tmp_path, setting):
    (tmp_path / "a.py").write_text("")
    env = {**os.environ, "DATA_PATH": str(tmp_path), "TOKENIZER_PATH": str(tmp_path / "a.py"), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "p1_pair.sh"), f"a {tmp_path}/a.py SEED=42 {setting}"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and setting.split("=")[0] in r.stderr and "P1 fixes" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ssm_layers", [[0, 1], [1], []])
def test_step_time_counts_the_models_matmuls(ssm_layers):
    """bench/step_time.py's FLOPs per token are 6 per weight of every linear map (the tied head included) plus
    the attention scores (ATTN_WINDOW keys in a windowed layer), for any set of hybrid layers (its attention-only
    row is SSM_LAYERS empty)."""
    args = small_args(ssm_layers=ssm_layers)
    model = tg.GPT(args)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, tg.CastedLinear)) + model.tok_emb.weight.numel()
    scores = 6 * args.num_layers * 2 * args.train_seq_len * args.model_dim
    assert bench_module("step_time").flops_per_token(args) == 6 * weights + scores
    windowed = small_args(ssm_layers=ssm_layers, attn_window=16, global_layers=[0])  # layer 1 scores 16 keys
    scores = 6 * 2 * (args.train_seq_len + 16) * args.model_dim
    assert bench_module("step_time").flops_per_token(windowed) == 6 * weights + scores


def test_step_time_profile_counts_kernels_not_the_ranges_around_them():
    """Inductor's and the optimizer's annotated ranges span the kernels they launch: counting them too doubled the
    GPU time of a step. CPU events do not count; times are per profiled step."""
    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    event = lambda name, us, device=cuda, annotation=False: types.SimpleNamespace(
        name=name, device_time=us, device_type=device, is_user_annotation=annotation)
    events = [event("## Call CompiledFxGraph abc ##", 9000, annotation=True), event("_scan_fwd_kernel", 2000),
              event("nvjet_sm90_tst_256x128", 3000), event("_scan_bwd_kernel", 4000),
              event("Optimizer.step#Muon.step", 5000, annotation=True), event("aten::mm", 7000, device=cpu)]
    kernels, cats = bench_module("step_time").gpu_times(events, steps=2)
    assert cats == {"selective scan": 3.0, "matmul": 1.5} and sum(kernels.values()) == 4.5


def test_eval_modes_scores_an_artifact_as_the_script_did_and_with_test_time_training(dataset, tmp_path):
    data, tokenizer = dataset
    env = {**TINY_ENV, "DATA_PATH": data, "TOKENIZER_PATH": tokenizer, "RUN_ID": "modes", "ITERATIONS": "5"}
    run_script(str(tmp_path), env)
    log = (tmp_path / "logs" / "modes.txt").read_text()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "eval_modes.py"), "final_model.int6.ptz", "--lanes", "",
                          "--ttt", "0:1:256,0.05:2:256"], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [(line[:34].strip(), line[34:].split()) for line in out.stdout.splitlines() if line.startswith(("flat", "sliding", "ttt"))]
    bpb = {name: float(cells[2]) for name, cells in rows}
    assert list(bpb) == ["flat", "sliding stride 64", "ttt lr 0 x1 chunk 256", "ttt lr 0.05 x2 chunk 256"]
    assert bpb["flat"] == pytest.approx(float(re.search(r"final_roundtrip_flat val_loss:\S+ val_bpb:(\S+)", log).group(1)), abs=1e-6)
    assert bpb["ttt lr 0 x1 chunk 256"] == pytest.approx(bpb["flat"], abs=1e-6)  # no learning: the flat score
    assert abs(bpb["ttt lr 0.05 x2 chunk 256"] - bpb["flat"]) > 1e-4  # each setting starts from the artifact again


def test_artifact_bytes_accounts_for_every_parameter(tmp_path):
    """bench/artifact_bytes.py reads an artifact the script wrote: per export kind, the parameters it counts are the
    model's, and an entropy it reports is no more than the stored bytes (int8 values: at most 1 byte each)."""
    import torch

    torch.manual_seed(0)
    state = tg.GPT(small_args(model_dim=256)).state_dict()
    path = tmp_path / "model.ptz"
    path.write_bytes(tg.serialize(state, {"mixer": 6, "mlp": 6})[0])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "artifact_bytes.py"), str(path)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    rows = {r[0]: r[1:] for r in (line.split() for line in out[2:])}
    for kind in ("fp16", "mixer", "mlp"):
        params = sum(t.numel() for n, t in state.items() if tg.export_kind(n, t) == kind)
        assert int(rows[kind][0].replace(",", "")) == params, kind
    assert float(rows["fp16"][3]) == 2.0 and 0 < float(rows["mixer"][3]) <= 1.01
