"""Logs of train_gpt.py -> submission.json in the records' format, with mean ± std and a significance test.

    python3 tools/summarize.py logs/p1/defaults_ttt_4fba588_seed*.txt --reference 2.3557 2.3592 [--out submission.json]
    python3 tools/summarize.py --check LOG_OR_FOLDER ...    # did every log run this train_gpt.py?

Every number comes from the logs. Refused with a clear message: a log without its final score line
(truncated), a log of more than one run, a loss or score that is not finite, logs of different code or settings
(only SEED and RUN_ID may differ), a run over the 16,000,000-byte cap, training or evaluation over 600 s.
--reference takes the val_loss values (nats) of the score to beat; the test is one-sided Welch: is our mean below
the reference mean by at least --margin nats (0.005)?
--check writes nothing: it exits 1, naming each log, when a log's `code: ... sha256:` line is not the sha256 of
--script (train_gpt.py beside tools/), so a submission folder's logs can be checked against its script in one step.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import statistics
import sys

SIZE_CAP, TIME_CAP_S = 16_000_000, 600.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_RUN_KEYS = ("seed", "run_id")


class LogError(ValueError):
    pass


def parse_log(path: str) -> dict:
    text = open(path, encoding="utf-8").read()

    def find(pattern, cast=str, required=True):
        m = re.search(pattern, text, re.M)
        if m is None:
            if required:
                raise LogError(f"{path}: no line matching {pattern!r}: truncated or not a train_gpt.py log")
            return None
        return cast(m.group(1)) if m.re.groups == 1 else tuple(cast(g) for g in m.groups())

    runs = len(re.findall(r"^code: ", text, re.M))
    if runs > 1:
        raise LogError(f"{path}: {runs} runs in one log ('code:' lines); a log must hold one run")
    nonfinite = re.search(r"^.*(?:loss|bpb):[-+]?(?:nan|inf)\b.*$", text, re.M)
    if nonfinite:
        raise LogError(f"{path}: a loss or score that is not finite: {nonfinite.group(0)!r}")
    final = find(r"^final_int8_zlib_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)$", float)
    steps, train_ms = find(r"^training: (\d+) steps in (\d+)ms", float)
    hyper = json.loads(find(r"^hyperparameters: (\{.*\})$"))
    return {
        "path": path,
        "code_bytes": find(r"^code: \S+ (\d+) bytes", int),
        "code_sha256": find(r"^code: .* sha256:(\w+)"),
        "torch": find(r"^env: python \S+ torch (\S+)"),
        "device": find(r"^env: .* device:(.*?) world_size:"),
        "world_size": find(r"world_size:(\d+)", int),
        "hyperparameters": hyper,
        "seed": hyper["seed"],
        "steps": int(steps),
        "train_time_s": train_ms / 1000,
        "step_avg_ms": train_ms / steps,
        "artifact_bytes": find(r"^Serialized model \S+: (\d+) bytes", int),
        "bytes_total": find(r"^Total submission size \S+: (\d+) bytes", int),
        "eval_time_s": sum(float(v) for v in re.findall(r"^(?:pre_export|final_roundtrip_\w+) .*eval_time:(\S+)s$", text, re.M)),
        "val_loss": final[0],
        "val_bpb": final[1],
        "val_bpb_before_ttt": (find(r"^final_roundtrip_[a-z]+ val_loss:\S+ val_bpb:(\S+) ", float)
                               if hyper.get("ttt_epochs", 0) > 0 else None),
        "over_cap": "ERROR: submission is" in text,
    }


def check_runs(runs: list[dict]) -> None:
    first = runs[0]
    for r in runs:
        if r["code_sha256"] != first["code_sha256"]:
            raise LogError(f"{r['path']}: different code (sha256 {r['code_sha256'][:12]} vs {first['code_sha256'][:12]})")
        differ = sorted(k for k in set(r["hyperparameters"]) | set(first["hyperparameters"])
                        if k not in PER_RUN_KEYS and r["hyperparameters"].get(k) != first["hyperparameters"].get(k))
        if differ:
            raise LogError(f"{r['path']}: settings differ from {first['path']}: {', '.join(differ)}")
        if r["over_cap"] or r["bytes_total"] > SIZE_CAP:
            raise LogError(f"{r['path']}: {r['bytes_total']} bytes, over the {SIZE_CAP}-byte cap")
        if r["train_time_s"] > TIME_CAP_S:
            raise LogError(f"{r['path']}: trained {r['train_time_s']:.1f}s, over {TIME_CAP_S:.0f}s")
        if r["eval_time_s"] > TIME_CAP_S:
            raise LogError(f"{r['path']}: evaluated {r['eval_time_s']:.1f}s, over {TIME_CAP_S:.0f}s")
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise LogError(f"repeated seeds {seeds}: each run must have its own")


def ttt_rule(hyper: dict) -> str:
    """What the final score's test-time training did, in the rules' terms (its settings are the logs' own)."""
    if not hyper.get("ttt_epochs", 0):
        return "no test-time training"
    return (f"score-first: each {hyper['ttt_chunk_tokens']}-token chunk of the validation split is scored before "
            f"{hyper['ttt_epochs']} epochs of training on it (lr {hyper['ttt_lr']}); "
            "val_bpb_before_ttt is the same artifact without it")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def welch_one_sided(ours: list[float], reference: list[float], margin: float) -> tuple[float, float, float]:
    """(t, df, p) for H1: mean(ours) < mean(reference) - margin. A single reference value is taken as exact."""
    m1, m2 = statistics.fmean(ours), statistics.fmean(reference)
    v1 = statistics.variance(ours) / len(ours) if len(ours) > 1 else 0.0
    v2 = statistics.variance(reference) / len(reference) if len(reference) > 1 else 0.0
    if v1 + v2 == 0:
        raise ValueError("no variance in either sample: a t-test needs at least two runs")
    t = (m2 - margin - m1) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / ((v1**2 / (len(ours) - 1) if v1 else 0.0) + (v2**2 / (len(reference) - 1) if v2 else 0.0))
    return t, df, student_t_sf(t, df)


def summarize(runs: list[dict], reference: list[float] | None, margin: float, meta: dict) -> dict:
    check_runs(runs)
    bpb, loss = [r["val_bpb"] for r in runs], [r["val_loss"] for r in runs]
    first = runs[0]
    summary = {
        **meta,
        "val_loss": round(statistics.fmean(loss), 8),
        "val_bpb": round(statistics.fmean(bpb), 8),
        "bytes_total": max(r["bytes_total"] for r in runs),
        "bytes_code": first["code_bytes"],
        "val_bpb_std": round(statistics.stdev(bpb), 8) if len(runs) > 1 else None,
        "seeds": [r["seed"] for r in runs],
        "seed_results": {str(r["seed"]): {k: r[k] for k in ("val_bpb", "val_bpb_before_ttt", "val_loss", "artifact_bytes", "steps")
                                          if r[k] is not None}
                         | {"step_avg_ms": round(r["step_avg_ms"], 2), "eval_time_s": round(r["eval_time_s"], 1)} for r in runs},
        "hardware": f"{first['world_size']}x {first['device']}",
        "pytorch_version": first["torch"],
        "compliance": {
            "train_under_600s": all(r["train_time_s"] <= TIME_CAP_S for r in runs),
            "artifact_under_16mb": all(r["bytes_total"] <= SIZE_CAP for r in runs),
            "eval_under_600s": all(r["eval_time_s"] <= TIME_CAP_S for r in runs),
            "score_first_ttt": ttt_rule(first["hyperparameters"]),
            "three_seeds": len(runs) >= 3,
        },
    }
    if reference:
        t, df, p = welch_one_sided(loss, reference, margin)
        summary["significance"] = {"reference_val_loss": reference, "margin_nats": margin, "t": round(t, 4),
                                   "df": round(df, 2), "p_value": p}
    return summary


def describe(summary: dict, runs: list[dict], code_commit: str, protocol: str, reference_name: str) -> dict:
    """The summary with what it stands for: the code its logs ran (sha256 read from them, the commit as given), the
    logs, how they ran, and what its significance test compares with."""
    summary |= {"code_commit": code_commit, "code_sha256": runs[0]["code_sha256"], "protocol": protocol,
                "logs": [r["path"] for r in runs]}
    if reference_name and "significance" in summary:
        summary["significance"] = {"reference": reference_name, **summary["significance"]}
    return summary


def log_files(paths: list[str]) -> list[str]:
    """The files named, and every .txt or .log file under a folder named."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(d, f) for d, _, names in os.walk(p) for f in names if f.endswith((".txt", ".log")))
        else:
            files.append(p)
    return files


def check_code(paths: list[str], script: str) -> tuple[list[str], list[str]]:
    """(logs checked, problems): each log's `code: NAME BYTES bytes sha256:HEX` line against script's sha256."""
    want = hashlib.sha256(open(script, "rb").read()).hexdigest()
    files, problems = log_files(paths), []
    if not files:
        problems.append(f"no logs in {' '.join(paths)}")
    for path in files:
        m = re.search(r"^code: \S+ \d+ bytes sha256:(\w+)$", open(path, encoding="utf-8", errors="replace").read(), re.M)
        if m is None:
            problems.append(f"{path}: no 'code: ... sha256:' line, not a train_gpt.py log")
        elif m.group(1) != want:
            problems.append(f"{path}: ran code sha256:{m.group(1)[:16]}..., {script} is sha256:{want[:16]}...")
    return files, problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("--reference", type=float, nargs="*", help="val_loss values (nats) of the score to beat")
    p.add_argument("--margin", type=float, default=0.005)
    p.add_argument("--out", default="submission.json")
    p.add_argument("--author", default="")
    p.add_argument("--github-id", default="")
    p.add_argument("--name", default="Hymba")
    p.add_argument("--blurb", default="")
    p.add_argument("--technique-summary", default="")
    p.add_argument("--date", default=None, help="the runs' date (default: today)")
    p.add_argument("--code-commit", default="", help="the commit whose train_gpt.py the logs ran (their sha256 is read)")
    p.add_argument("--protocol", default="", help="how the runs were made (hardware, data, settings)")
    p.add_argument("--reference-name", default="", help="what the --reference values are")
    p.add_argument("--check", action="store_true", help="only check that every log ran --script's code")
    p.add_argument("--script", default=os.path.join(ROOT, "train_gpt.py"), help="the code --check compares with")
    a = p.parse_args(argv)
    if a.check:
        files, problems = check_code(a.logs, a.script)
        if problems:
            sys.exit("check failed:\n  " + "\n  ".join(problems))
        print(f"ok: {len(files)} logs ran {a.script}")
        return
    meta = {"author": a.author, "github_id": a.github_id, "name": a.name, "blurb": a.blurb,
            "date": a.date or datetime.date.today().isoformat(), "technique_summary": a.technique_summary}
    try:
        runs = [parse_log(path) for path in a.logs]
        summary = summarize(runs, a.reference, a.margin, meta)
    except LogError as e:
        sys.exit(f"refused: {e}")
    describe(summary, runs, a.code_commit, a.protocol, a.reference_name)
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    bpb = [r["val_bpb"] for r in summary["seed_results"].values()]
    line = f"{len(bpb)} runs: val_bpb {summary['val_bpb']:.5f}" + (f" ± {summary['val_bpb_std']:.5f}" if len(bpb) > 1 else "")
    if "significance" in summary:
        s = summary["significance"]
        line += f"; val_loss below the reference by ≥ {s['margin_nats']} nats: t={s['t']}, df={s['df']}, p={s['p_value']:.3g}"
    print(line + f"; wrote {a.out}")


if __name__ == "__main__":
    main()
