"""The benchmark code paths, through --quick (tiny shapes, Triton interpreter on CPU)."""

import csv
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import expect_input_error

from benchmarks import attention as attention_bench
from benchmarks import layer_norm as layer_norm_bench

ROOT = Path(__file__).resolve().parents[1]


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_attention_quick(tmp_path):
    assert attention_bench.main(["--quick", "--causal", "causal", "--output_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "attention.csv")
    providers = {r["provider"] for r in rows}
    assert {"ours", "sdpa-math", "eager"} <= providers
    checks = [r for r in rows if r["metric"] == "rel_err"]
    assert checks and all(r["status"] == "ok" for r in checks)
    tput = [r for r in rows if r["metric"] == "throughput"]
    assert {r["mode"] for r in tput} == {"fwd", "bwd", "fwd+bwd"}
    assert all(float(r["p50"]) > 0 and r["device"] and r["commit"] and r["date"] for r in tput)
    summary = (tmp_path / "attention.md").read_text()
    assert "speedup" in summary and "4·B·H·T²·D" in summary


def test_runs_merge_into_one_csv_and_replot_needs_no_measuring(tmp_path, monkeypatch):
    """A sweep split over several runs (each under a device time limit) ends in one CSV: a later run
    replaces the rows of the points it measured again and keeps the rest. --replot rebuilds the
    summary from the CSV alone."""
    monkeypatch.setattr(attention_bench, "suites", lambda quick: {"quick": [dict(B=1, H=2, H_kv=1, T=9, D=32)]})
    out = ["--quick", "--output_dir", str(tmp_path)]
    assert attention_bench.main([*out, "--causal", "causal"]) == 0
    first = read_rows(tmp_path / "attention.csv")
    assert attention_bench.main([*out, "--causal", "full"]) == 0
    assert attention_bench.main([*out, "--causal", "causal"]) == 0
    rows = read_rows(tmp_path / "attention.csv")
    causal = [r for r in rows if r["causal"] == "1"]
    assert len(causal) == len(first) and {r["causal"] for r in rows} == {"0", "1"}
    assert len(rows) == 2 * len(first)

    (tmp_path / "attention.md").unlink()
    monkeypatch.setattr(attention_bench, "run_point", None)  # replot must not measure
    assert attention_bench.main(["--replot", "--output_dir", str(tmp_path)]) == 0
    summary = (tmp_path / "attention.md").read_text()
    assert "non-causal" in summary and "## quick, fp32, causal, fwd " in summary


def test_attention_records_mismatch_and_oom_without_timing(tmp_path, monkeypatch):
    real = attention_bench.providers

    def with_broken(quick):
        table = real(quick)
        ours, ctx = table["ours"]

        def out_of_memory(q, k, v, causal):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")

        table = {"ours": table["ours"], "wrong": (lambda q, k, v, causal: ours(q, k, v, causal) * 1.1, ctx),
                 "oom": (out_of_memory, ctx)}
        return table

    monkeypatch.setattr(attention_bench, "providers", with_broken)
    monkeypatch.setattr(attention_bench, "suites", lambda quick: {"quick": [dict(B=1, H=2, H_kv=1, T=9, D=32)]})
    attention_bench.main(["--quick", "--causal", "causal", "--output_dir", str(tmp_path)])
    rows = read_rows(tmp_path / "attention.csv")
    wrong = [r for r in rows if r["provider"] == "wrong"]
    assert wrong and all(r["status"] == "mismatch" for r in wrong)
    assert not any(r["metric"] == "throughput" for r in wrong)
    oom = [r for r in rows if r["provider"] == "oom"]
    assert oom and all(r["status"] == "oom" and r["p50"] == "" for r in oom)


def test_attention_flops():
    shape = dict(B=2, H=3, T=8, D=4)
    assert attention_bench.attention_flops(shape, causal=False, mode="fwd") == 4 * 2 * 3 * 64 * 4
    assert attention_bench.attention_flops(shape, causal=True, mode="fwd+bwd") == 4 * 2 * 3 * 64 * 4 * 0.5 * 3.5


def test_layer_norm_quick(tmp_path):
    assert layer_norm_bench.main(["--quick", "--hidden", "96", "--output_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "layer_norm.csv")
    assert {r["kernel"] for r in rows} == {"layer_norm", "add_layer_norm"}
    assert all(r["status"] == "ok" for r in rows if r["metric"] == "rel_err")
    bandwidth = [r for r in rows if r["metric"] == "bandwidth"]
    assert {(r["provider"], r["mode"]) for r in bandwidth} >= {("ours", "fwd"), ("torch", "fwd+bwd")}
    assert (tmp_path / "layer_norm.md").exists()
    assert layer_norm_bench.main(["--replot", "--output_dir", str(tmp_path)]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("module", ["attention", "layer_norm", "training"])
def test_full_mode_needs_cuda_and_exits_2(module, monkeypatch):
    """Without a GPU a full run is an input error that names the fix, before it measures anything."""
    from benchmarks import common

    monkeypatch.setattr(common, "environment", lambda: pytest.fail("got past the CUDA check"))
    bench = importlib.import_module(f"benchmarks.{module}")
    expect_input_error(bench.main, [], "needs a CUDA GPU",
                       "run with --quick for a CPU smoke run through the Triton interpreter")


@pytest.mark.parametrize("module, argv, fragment", [
    ("layer_norm", ["--hidden", "0"], "argument --hidden: must be at least 1, got 0"),
    ("layer_norm", ["--hidden", "64", "-3"], "argument --hidden: must be at least 1, got -3"),
    ("layer_norm", ["--rows", "0"], "argument --rows: must be at least 1, got 0"),
    ("attention", ["--suite", "nosuch"], "invalid choice: 'nosuch' (choose from 'gpt2', 'fa-d64'"),
    ("attention", ["--seqlens", "-5"], "argument --seqlens: must be at least 1, got -5"),
    ("attention", ["--max_seqlen", "0"], "argument --max_seqlen: must be at least 1, got 0"),
    ("attention", ["--provider", "nosuch"], "invalid choice: 'nosuch' (choose from 'ours', 'sdpa-flash'"),
    ("attention", ["--seqlens", "1024"], "leave no shape to measure (--quick suites: quick: T = 17, 40)"),
    ("training", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    ("training", ["--block_size", "1"], "argument --block_size: must be at least 2, got 1"),
    ("training", ["--batch_size", "0"], "argument --batch_size: must be at least 1, got 0"),
    ("training", ["--presets", "nosuch"], "invalid choice: 'nosuch' (choose from 'gpt2', 'gpt2-medium'"),
])
def test_bad_flags_are_input_errors_before_measuring(module, argv, fragment, monkeypatch, tmp_path):
    """Each bad value is one `prog: error:` line and exit status 2, in --quick mode too, before
    anything is measured."""
    from benchmarks import common

    monkeypatch.setattr(common, "environment", lambda: pytest.fail("measured before checking the flags"))
    bench = importlib.import_module(f"benchmarks.{module}")
    expect_input_error(bench.main, ["--quick", "--output_dir", tmp_path, *argv], fragment)


def test_merge_results_checks_every_folder_before_merging(tmp_path):
    from benchmarks import common, merge_results

    good, empty, missing, dest = (tmp_path / n for n in ("good", "empty", "missing", "dest"))
    row = dict(benchmark="attention", kernel="flash_attention", provider="ours", mode="fwd", dtype="fp32",
               suite="quick", B=1, H=2, H_kv=1, T=9, D=32, causal=1, metric="time", unit="ms", p50=1.0, status="ok",
               device="dev")
    common.write_csv([row], good / "dev" / "attention.csv", attention_bench.SHAPE_FIELDS)
    (empty / "dev").mkdir(parents=True)
    expect_input_error(merge_results.main, [good, missing, "--into", dest],
                       f"no folder {missing}: give the unpacked benchmarks/results folder")
    expect_input_error(merge_results.main, [good, empty, "--into", dest], f"no benchmark CSVs in {empty}/<device>/")
    assert not dest.exists()  # the good folder was not merged either
    assert merge_results.main([str(good), "--into", str(dest)]) == 0 and (dest / "dev" / "attention.md").exists()


def test_targets_needs_an_existing_results_folder(tmp_path):
    from benchmarks import targets

    expect_input_error(targets.main, ["--results", tmp_path / "missing"], f"no folder {tmp_path / 'missing'}")


@pytest.mark.parametrize("script, argv, cwd, code", [
    ("attention.py", ["--help"], "elsewhere", 0),
    ("layer_norm.py", ["--quick", "--hidden", "0"], "root", 2),
])
def test_benchmarks_run_by_path(script, argv, cwd, code, tmp_path):
    """`python benchmarks/X.py`, as from the repository root or another folder, without the
    checkout on PYTHONPATH: --help exits 0, a bad flag is one line and exit status 2."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    path = ROOT / "benchmarks" / script if cwd == "elsewhere" else Path("benchmarks") / script
    result = subprocess.run([sys.executable, str(path), *argv], cwd=tmp_path if cwd == "elsewhere" else ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr[-3000:]
    if code == 0:
        assert "usage:" in result.stdout and "--suite" in result.stdout
    else:
        assert result.stderr.splitlines() == [
            "benchmarks.layer_norm: error: argument --hidden: must be at least 1, got 0 (see --help)"]


@pytest.mark.slow
def test_training_quick(tmp_path):
    """The real pretraining script, twice (sdpa, then triton in the interpreter), on the same data."""
    from benchmarks import training as training_bench

    assert training_bench.main(["--quick", "--output_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "training.csv")
    throughput = {r["provider"]: r for r in rows if r["metric"] == "tokens_per_s"}
    assert set(throughput) == {"sdpa", "triton"}
    assert all(r["status"] == "ok" and float(r["p50"]) > 0 for r in throughput.values())
    losses = {}
    for r in rows:
        if r["metric"] == "train_loss":
            losses.setdefault(r["provider"], {})[int(r["step"])] = float(r["p50"])
    assert losses["sdpa"].keys() == losses["triton"].keys() == {1, 2, 3}
    for step, loss in losses["sdpa"].items():
        # fp32 on both paths: the kernels differ from SDPA by float32 rounding only.
        assert abs(loss - losses["triton"][step]) < 1e-4 * loss
    assert training_bench.main(["--replot", "--output_dir", str(tmp_path)]) == 0
    assert "triton / sdpa" in (tmp_path / "training.md").read_text()


def test_targets_compare_the_right_points(tmp_path):
    """benchmarks.targets picks the target point out of each CSV, compares ours with the fastest
    SDPA backend, and says "not measured" where a point is missing or failed."""
    from benchmarks import common, targets

    stamp = dict(device="GPU X", date="2026-01-01", commit="abc1234", status="ok", metric="time")
    point = dict(benchmark="attention", kernel="flash_attention", suite="gpt2", B=16, H=12, H_kv=12, T=1024, D=64,
                 causal=1, dtype="bf16", **stamp)
    times = {"fwd": {"ours": 0.050, "sdpa-flash": 0.060, "sdpa-cudnn": 0.055, "sdpa-math": 0.030},
             "fwd+bwd": {"ours": 0.300, "sdpa-flash": 0.200, "sdpa-cudnn": 0.250}}
    rows = [dict(point, provider=p, mode=m, p50=t) for m, by in times.items() for p, t in by.items()]
    rows[3]["status"] = "mismatch"  # a failed provider is never the one to beat
    rows.append(dict(point, provider="ours", mode="fwd", T=2048, p50=0.001))  # another point
    common.write_csv(rows, tmp_path / "attention.csv", attention_bench.SHAPE_FIELDS)
    training = [dict(benchmark="training", preset="gpt2", dtype="bf16", provider=p, p50=v,
                     **dict(stamp, metric="tokens_per_s")) for p, v in (("sdpa", 100.0), ("triton", 110.0))]
    common.write_csv(training, tmp_path / "training.csv", ["preset", "block_size", "batch_size", "step"])

    fwd, fwd_bwd, ln_speed, ln_copy, train = targets.check(tmp_path)
    assert fwd["value"] == pytest.approx(0.055 / 0.050) and "sdpa-cudnn" in fwd["measured"]
    assert fwd_bwd["value"] == pytest.approx(0.200 / 0.300)
    assert ln_speed["value"] is None and ln_copy["value"] is None
    assert train["value"] == pytest.approx(1.1)
    table = targets.render("GPU X", [fwd, fwd_bwd, ln_speed, ln_copy, train])
    statuses = [line.split(" | ")[3] for line in table.splitlines()[4:]]
    assert statuses == ["met", "missed", "not measured", "not measured", "met"]


def test_merge_results_from_two_calls(tmp_path, monkeypatch):
    """Two GPU calls that did not carry each other's results merge into one folder: points from
    both, the later call's rows where both measured a point, summaries rebuilt."""
    from benchmarks import merge_results

    monkeypatch.setattr(attention_bench, "suites", lambda quick: {"quick": [dict(B=1, H=2, H_kv=1, T=9, D=32)]})
    first, second, dest = (tmp_path / n / "dev" for n in ("a", "b", "dest"))
    assert attention_bench.main(["--quick", "--causal", "causal", "--output_dir", str(first)]) == 0
    assert attention_bench.main(["--quick", "--output_dir", str(second)]) == 0  # causal again, and non-causal
    merge_results.merge(first.parent, dest.parent)
    merge_results.merge(second.parent, dest.parent)
    rows = read_rows(dest / "attention.csv")
    assert len(rows) == len(read_rows(second / "attention.csv"))
    checks = {(r["causal"], r["p50"]) for r in rows if r["metric"] == "rel_err" and r["provider"] == "ours"}
    assert checks == {(r["causal"], r["p50"]) for r in read_rows(second / "attention.csv")
                      if r["metric"] == "rel_err" and r["provider"] == "ours"}
    assert "non-causal" in (dest / "attention.md").read_text()
