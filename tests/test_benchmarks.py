"""The benchmark code paths, through --quick (tiny shapes, Triton interpreter on CPU)."""

import csv

import pytest
import torch

from benchmarks import attention as attention_bench
from benchmarks import layer_norm as layer_norm_bench


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
def test_full_mode_needs_cuda_and_exits_cleanly(capsys):
    assert attention_bench.main([]) == 0
    assert layer_norm_bench.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


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
