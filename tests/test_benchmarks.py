"""The benchmark code paths, through --quick (tiny shapes, Triton interpreter on CPU)."""

import csv
import importlib
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import expect_input_error, load_script

from benchmarks import attention as attention_bench
from benchmarks import common
from benchmarks import layer_norm as layer_norm_bench
from gpt2 import GPT2, GPT2Config

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
    assert checks and all(r["status"] == "ok" and r["note"].startswith("worst: ") for r in checks)
    if not torch.cuda.is_available():  # FlexAttention has no backward on CPU
        flex = [r for r in rows if r["provider"] == "flex"]
        assert flex and all(r["status"] == "skipped" and r["note"].startswith("CUDA only") for r in flex)
    tput = [r for r in rows if r["metric"] == "throughput"]
    assert {r["mode"] for r in tput} == {"fwd", "bwd", "fwd+bwd"}
    assert all(float(r["p50"]) > 0 and r["device"] and r["commit"] and r["date"] for r in tput)
    summary = (tmp_path / "attention.md").read_text()
    assert "speedup" in summary and "4·B·H·T²·D" in summary

    # The documents suite: every provider checked against the float64 dense-mask reference first.
    documents = [r for r in rows if r["suite"] == "documents-quick"]
    assert {r["documents"] for r in documents} == {"uniform-1-12"} and {r["causal"] for r in documents} == {"1"}
    checked = {r["provider"] for r in documents if r["metric"] == "rel_err" and r["status"] == "ok"}
    assert {"ours", "sdpa-mask", "eager"} <= checked
    timed = {(r["provider"], r["mode"]) for r in documents if r["metric"] == "time" and r["status"] == "ok"}
    assert {("ours", m) for m in ("fwd", "bwd", "fwd+bwd")} | {("sdpa-mask", "mask")} <= timed
    assert "causal within documents, fwd+bwd" in summary and "× ours causal" in summary


def test_document_suite_records_a_failing_mask_and_goes_on(tmp_path, monkeypatch):
    """A provider whose mask cannot be built (out of memory, say) is recorded, not fatal: the
    others at the point are still checked and timed."""
    real = attention_bench.document_providers

    def failing(document_ids):
        table, builders = real(document_ids)

        def out_of_memory(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")

        table["sdpa-mask"] = (out_of_memory, table["sdpa-mask"][1])
        builders["sdpa-mask"] = (out_of_memory, "the dense mask")
        return table, builders

    monkeypatch.setattr(attention_bench, "document_providers", failing)
    assert attention_bench.main(["--quick", "--suite", "documents-quick", "--output_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "attention.csv")
    assert {r["status"] for r in rows if r["provider"] == "sdpa-mask"} == {"oom"}
    timed = {(r["provider"], r["mode"]) for r in rows if r["metric"] == "time" and r["status"] == "ok"}
    assert {("ours", "fwd+bwd"), ("ours", "mask"), ("eager", "fwd+bwd")} <= timed


def test_packed_document_ids_pack_the_pool():
    """Rows of documents from the pool, each closed by an end-of-text token, cut into rows; the
    visible pairs by the FLOP convention (ΣL²/2) are the dense mask's count less the diagonal's half."""
    from gpt2.documents import document_mask

    B, T = 3, 50
    ids = attention_bench.packed_document_ids(B, T, "uniform-2-5", "cpu", seed=1)
    assert ids.shape == (B, T) and ids.dtype == torch.int32 and (ids[:, 0] == 0).all()
    assert torch.isin(ids[:, 1:] - ids[:, :-1], torch.tensor([0, 1], dtype=torch.int32)).all()
    for row in ids:  # the documents a row holds whole: pool lengths 2..5, plus the end-of-text token
        _, lengths = torch.unique_consecutive(row, return_counts=True)
        assert len(lengths) > 2 and set(lengths[1:-1].tolist()) <= {3, 4, 5, 6}
    shape = dict(B=B, H=1, H_kv=1, T=T, D=8)
    pairs = attention_bench.visible_pairs(shape, True, ids)
    assert pairs == document_mask(ids, causal=True).sum().item() - B * T / 2
    assert pairs < attention_bench.visible_pairs(shape, True)
    again = attention_bench.packed_document_ids(B, T, "uniform-2-5", "cpu", seed=1)
    assert torch.equal(ids, again)


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


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # uncompiled on purpose
def test_flex_document_mask_is_the_reference_mask():
    """The FlexAttention peer's document block mask (run here uncompiled, float64, on CPU) gives the
    float64 dense-mask reference: what the GPU run compares against is the same attention."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    from gpt2_kernels import attention_ref

    B, H, T, D = 2, 2, 300, 16  # several of Flex's 128-blocks, a partial last one
    ids = attention_bench.packed_document_ids(B, T, "uniform-1-90", "cpu", seed=3)
    block_mask = flex_attention.create_block_mask(attention_bench.document_mask_mod(ids), B, None, T, T, device="cpu")
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(flex_attention.flex_attention(q, k, v, block_mask=block_mask),
                               attention_ref(q, k, v, causal=True, document_ids=ids), rtol=1e-12, atol=1e-12)


def test_attention_flops():
    shape = dict(B=2, H=3, T=8, D=4)
    full, causal = (attention_bench.visible_pairs(shape, c) for c in (False, True))
    assert attention_bench.attention_flops(shape, "fwd", full) == 4 * 2 * 3 * 64 * 4
    assert attention_bench.attention_flops(shape, "fwd+bwd", causal) == 4 * 2 * 3 * 64 * 4 * 0.5 * 3.5
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8])  # documents of 3, 2, 3 tokens; one of 8
    assert attention_bench.visible_pairs(shape, True, ids) == (9 + 4 + 9 + 64) / 2


def test_layer_norm_quick(tmp_path):
    assert layer_norm_bench.main(["--quick", "--hidden", "96", "--output_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "layer_norm.csv")
    assert {r["kernel"] for r in rows} == {"layer_norm", "add_layer_norm"}
    assert all(r["status"] == "ok" for r in rows if r["metric"] == "rel_err")
    bandwidth = [r for r in rows if r["metric"] == "bandwidth"]
    assert {(r["provider"], r["mode"]) for r in bandwidth} >= {("ours", "fwd"), ("torch", "fwd+bwd")}
    # Each point's yardstick is a copy of its own size, measured with it, and "of copy" is over that.
    copies = {(r["kernel"], r["dtype"], r["rows"], r["hidden"]): float(r["p50"]) for r in bandwidth
              if r["provider"] == "copy"}
    assert len(copies) == 2 * 2 and all(r["mode"] == "copy" for r in bandwidth if r["provider"] == "copy")
    for r in bandwidth:
        if r["provider"] == "ours":
            frac = next(f for f in rows if f["metric"] == "fraction_of_copy" and
                        all(f[k] == r[k] for k in ("kernel", "provider", "mode", "dtype", "rows", "hidden")))
            copy = copies[(r["kernel"], r["dtype"], r["rows"], r["hidden"])]
            assert float(frac["p50"]) == pytest.approx(float(r["p50"]) / copy)
    assert not any(r["metric"].endswith("_cudagraph") for r in rows) or torch.cuda.is_available()
    assert (tmp_path / "layer_norm.md").exists()
    assert layer_norm_bench.main(["--replot", "--output_dir", str(tmp_path)]) == 0
    assert "| copy | ours / copy | ours (graph) |" in (tmp_path / "layer_norm.md").read_text()


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
    ("attention", ["--seqlens", "1024"],
     "leave no shape to measure (--quick suites: quick: T = 17, 40; documents-quick: T = 40; documents suites"),
    ("attention", ["--suite", "documents-quick", "--causal", "full"], "documents suites: causal only"),
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
    # the model the run trained: the preset's vocabulary, though the BPE trained for it has 300 tokens
    trained = GPT2.from_pretrained(tmp_path / "training_runs" / "gpt2-tiny_triton")
    assert trained.config.vocab_size == GPT2Config.from_preset("gpt2-tiny").vocab_size
    params = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "parameters"}
    assert params == {"sdpa": trained.num_parameters(), "triton": trained.num_parameters()}
    assert {r["provider"]: r["sdpa_backend"] for r in rows if r["metric"] == "tokens_per_s"} == \
        {"sdpa": "flash-cpu", "triton": ""}
    assert training_bench.main(["--replot", "--output_dir", str(tmp_path)]) == 0
    assert "triton / sdpa" in (tmp_path / "training.md").read_text()


def test_the_training_benchmark_trains_gpt2_124m():
    """The gpt2 preset's run is the real GPT-2 124M: 124,439,808 parameters, the 50,257-way softmax,
    whatever the size of the tokenizer trained for it (on the built-in corpus, about 16k tokens)."""
    from benchmarks import training as training_bench

    assert training_bench.parameters("gpt2", None) == 124_439_808
    args = training_bench.parse_args(["--presets", "gpt2", "--vocab_size", "16000"])
    args.block_size, args.batch_size, args.steps = 1024, 16, 40
    cmd = training_bench.pretrain_command(args, "gpt2", "triton", Path("out"), None)
    assert cmd[cmd.index("--config_overrides") + 1] == "vocab_size=50257"
    assert training_bench.model_overrides("gpt2", "n_layer=2") == "vocab_size=50257,n_layer=2"
    assert training_bench.model_overrides("gpt2", "vocab_size=50304") == "vocab_size=50304"


def test_each_training_provider_passes_its_flags():
    """A provider's command carries exactly its flags, and pretrain.py accepts each of them."""
    from benchmarks import training as training_bench

    args = training_bench.parse_args(["--presets", "gpt2"])
    args.block_size, args.batch_size, args.steps, args.vocab_size = 1024, 16, 40, 50257
    flags = {"--compile", "--cuda_graphs", "--document_masking", "--gradient_checkpointing"}
    want = {"sdpa": set(), "triton+graphs": {"--cuda_graphs"}, "sdpa+graphs": {"--cuda_graphs"},
            "sdpa+compile": {"--compile"}, "triton+docs": {"--document_masking"},
            "sdpa+ckpt": {"--gradient_checkpointing"}}
    for provider, expected in want.items():
        cmd = training_bench.pretrain_command(args, "gpt2", provider, Path("out"), None)
        assert flags & set(cmd) == expected, provider
        assert cmd[cmd.index("--kernels") + 1] == training_bench.PROVIDERS[provider].kernels
    pretrain = load_script(common.ROOT / "scripts" / "pretrain.py")
    parsed = pretrain.parse_args(training_bench.pretrain_command(args, "gpt2", "triton+graphs", Path("o"), None)[2:])
    assert parsed.cuda_graphs and parsed.kernels == "triton"


def test_sdpa_backend_names_what_ran():
    """common.sdpa_backend reads the backend off the op SDPA dispatched to: its default here, and
    the one an sdpa_kernel context forces."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 17, 16)
    assert common.sdpa_backend(q, q, q, is_causal=True) == "flash-cpu"
    with sdpa_kernel(SDPBackend.MATH):
        assert common.sdpa_backend(q, q, q, is_causal=True) == "math"


def test_training_quick_with_document_masking(tmp_path):
    """--document_masking runs through pretrain.py for both kernels (sdpa: the dense mask), whose
    losses agree, and its throughput is set beside the unmasked run's."""
    from benchmarks import training as training_bench

    providers = ["triton", "sdpa+docs", "triton+docs"]
    assert training_bench.main(["--quick", "--providers", *providers, "--output_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "training.csv")
    losses = {}
    for r in rows:
        if r["metric"] == "train_loss":
            losses.setdefault(r["provider"], {})[int(r["step"])] = float(r["p50"])
    assert set(losses) == set(providers)
    for step, loss in losses["sdpa+docs"].items():
        assert abs(loss - losses["triton+docs"][step]) < 1e-4 * loss
    log = (tmp_path / "training_runs" / "training_gpt2-tiny_triton_docs.log").read_text()
    assert "documents  masked" in log
    summary = (tmp_path / "training.md").read_text()
    assert "triton+docs / sdpa+docs" in summary and "triton+docs / triton" in summary


def test_training_quick_with_activation_checkpointing(tmp_path):
    """+ckpt runs pretrain.py with --gradient_checkpointing: the same losses, bit for bit, beside the
    plain run's, and its throughput as a ratio."""
    from benchmarks import training as training_bench

    assert training_bench.main(["--quick", "--providers", "sdpa", "sdpa+ckpt", "--output_dir", str(tmp_path)]) == 0
    losses = {}
    for r in read_rows(tmp_path / "training.csv"):
        if r["metric"] == "train_loss":
            losses.setdefault(r["provider"], {})[int(r["step"])] = r["p50"]
    assert losses["sdpa"] == losses["sdpa+ckpt"] and len(losses["sdpa"]) == 3
    log = (tmp_path / "training_runs" / "training_gpt2-tiny_sdpa_ckpt.log").read_text()
    assert "every block recomputed in backward" in log
    assert "sdpa+ckpt / sdpa" in (tmp_path / "training.md").read_text()


def test_activation_memory_and_overhead_run(tmp_path):
    """The two host-side probes run end to end at tiny sizes and write their tables."""
    from benchmarks import activation_memory, overhead

    assert activation_memory.main(["--preset", "gpt2-tiny", "--batch_size", "1", "--seq_len", "8", "--repeats", "1",
                                   "--output_dir", str(tmp_path)]) == 0
    text = (tmp_path / "activation_memory.md").read_text()
    assert "| --gradient_checkpointing |" in text and "x the time" in text
    assert overhead.main(["--quick", "--output_dir", str(tmp_path)]) == 0
    text = (tmp_path / "overhead.md").read_text()
    assert "| attention fwd+bwd: ours through torch.ops (the dispatcher) |" in text and "cProfile" in text
    assert "The sdpa rows ran SDPA's flash-cpu backend" in text


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
                     **dict(stamp, metric="tokens_per_s"))
                for p, v in (("sdpa", 100.0), ("triton", 110.0), ("triton+graphs", 120.0), ("sdpa+compile", 110.0))]
    training.append(dict(training[0], provider="triton+graphs", preset="gpt2-medium", p50=999.0))  # another point
    common.write_csv(training, tmp_path / "training.csv", ["preset", "block_size", "batch_size", "step"])

    fwd, fwd_bwd, ln_speed, ln_copy, *train = targets.check(tmp_path)
    assert fwd["value"] == pytest.approx(0.055 / 0.050) and "sdpa-cudnn" in fwd["measured"]
    assert fwd_bwd["value"] == pytest.approx(0.200 / 0.300)
    assert ln_speed["value"] is None and ln_copy["value"] is None
    assert [t["value"] for t in train] == pytest.approx([1.1, 1.2, 120 / 110])
    assert "triton+graphs / sdpa+compile" in train[2]["target"] and train[2]["required"] == 1.05
    table = targets.render("GPU X", [fwd, fwd_bwd, ln_speed, ln_copy, *train])
    statuses = [line.split(" | ")[3] for line in table.splitlines()[4:]]
    assert statuses == ["met", "missed", "not measured", "not measured", "met", "missed", "met"]


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


def whole_tensor_error(out, ref) -> float:
    """The old checks' measure: ||out - ref|| / ||ref|| over the whole tensor."""
    return common.worst_relative_error(out, ref, lead=0)[0]


def wrong_in_one_head(batch, head, shape):
    """Our attention with one head of one batch element scaled by 1.1 (its output, and so dq too)."""
    ours, _ = attention_bench.providers(quick=True)["ours"]
    scale = torch.ones(shape["B"], shape["H"], 1, 1)
    scale[batch, head] = 1.1
    return lambda q, k, v, causal: ours(q, k, v, causal) * scale


def test_attention_check_covers_every_batch_element_and_head():
    """One wrong head of a batch element other than the first, in a K/V head group other than the
    first: the check finds it and names it, where the old check (batch 0, first K/V group) passed."""
    shape = dict(B=2, H=4, H_kv=2, T=9, D=32)
    wrong = wrong_in_one_head(batch=1, head=3, shape=shape)
    q, k, v, dout = attention_bench.make_inputs(shape, torch.float32, "cpu")
    ref = attention_bench.reference(q, k, v, dout, causal=True)
    tol = attention_bench.MISMATCH_TOL[torch.float32]

    out = wrong(q, k, v, True)
    out.backward(dout)
    group = shape["H"] // shape["H_kv"]
    old_slices = (out[:1, :group], q.grad[:1, :group], k.grad[:1, :1], v.grad[:1, :1])
    assert max(whole_tensor_error(g, r[:1, :g.shape[1]]) for g, r in zip(old_slices, ref)) < tol

    err, where = attention_bench.check(wrong, nullcontext, q, k, v, dout, True, ref)
    assert err == pytest.approx(0.1, rel=1e-3) and "at batch 1, head 3" in where
    env = dict(device="cpu", commit="x", date="d")
    rows = attention_bench.run_point("quick", shape, "fp32", True, {"wrong": (wrong, nullcontext)}, env, True, "cpu")
    check_row = next(r for r in rows if r["metric"] == "rel_err")
    assert check_row["status"] == "mismatch" and "batch 1, head 3" in check_row["note"]
    assert {r["status"] for r in rows if r["metric"] == "time"} == {"mismatch"}


def test_reference_slab_by_slab_equals_all_at_once(monkeypatch):
    """The float64 reference, a slab of (batch elements, K/V head groups) at a time: the slabs
    cover every batch element and K/V head once, each within the budget (or one group), and give
    the same out and gradients as attention_ref over the whole tensors."""
    from gpt2_kernels import attention_ref

    B, H_kv, group_scores = 3, 4, 81
    for budget in (1, 2 * 81, 5 * 81, 12 * 81, 10**9):
        monkeypatch.setattr(attention_bench, "REFERENCE_SCORES", budget)
        slabs = attention_bench.reference_slabs(B, H_kv, group_scores)
        covered = [(b, g) for bs, gs in slabs for b in range(B)[bs] for g in range(H_kv)[gs]]
        assert sorted(covered) == [(b, g) for b in range(B) for g in range(H_kv)], budget
        assert all(len(range(B)[bs]) * len(range(H_kv)[gs]) * group_scores <= max(budget, group_scores)
                   for bs, gs in slabs)

    shape = dict(B=3, H=4, H_kv=2, T=9, D=16)
    q, k, v, dout = attention_bench.make_inputs(shape, torch.float32, "cpu")
    whole = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = attention_ref(*whole, causal=True, upcast=True)
    out.backward(dout.double())
    expected = [out.detach()] + [t.grad for t in whole]
    for budget in (1, 10**9):  # one K/V head group per slab; everything in one
        monkeypatch.setattr(attention_bench, "REFERENCE_SCORES", budget)
        for got, want in zip(attention_bench.reference(q, k, v, dout, causal=True), expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_eager_and_math_skipped_past_the_score_limit(tmp_path, monkeypatch):
    """Eager attention and SDPA's math backend are not run where they would materialise more than
    MATERIALISED_SCORES_LIMIT (2^31) scores: status "skipped" with the reason, not timed."""
    table = attention_bench.providers(quick=True)
    meta = dict(device="meta")
    for name in ("eager", "sdpa-math"):
        fn, _ = table[name]
        q = k = torch.empty(1, 1, 46341, 8, **meta)  # 46341^2 > 2^31
        with pytest.raises(common.NotMeasured, match="materialised scores") as caught:
            fn(q, k, k, True)
        assert caught.value.status == "skipped"
    eager, _ = table["eager"]
    for B, H, T in ((16, 12, 1024), (2, 16, 8192)):  # the GPT-2 target point; exactly 2^31
        assert eager(torch.empty(B, H, T, 8, **meta), *[torch.empty(B, H, T, 8, **meta)] * 2, True).is_meta

    monkeypatch.setattr(attention_bench, "MATERIALISED_SCORES_LIMIT", 2 * 9 * 9 - 1)  # below B·H·T² = 162
    monkeypatch.setattr(attention_bench, "suites", lambda quick: {"quick": [dict(B=1, H=2, H_kv=1, T=9, D=32)]})
    assert attention_bench.main(["--quick", "--causal", "causal", "--output_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "attention.csv")
    for name in ("eager", "sdpa-math"):
        mine = [r for r in rows if r["provider"] == name]
        assert {r["status"] for r in mine} == {"skipped"} and {r["mode"] for r in mine} == {"fwd", "bwd", "fwd+bwd"}
        assert all("B·H·T² = 162 materialised scores > 161" in r["note"] and r["p50"] == "" for r in mine)
    assert any(r["provider"] == "ours" and r["metric"] == "throughput" for r in rows)


def test_optional_peers_unsupported_when_not_installed(monkeypatch):
    """Liger-Kernel and FlexAttention, when their package is missing, are "unsupported" with the
    note "not installed (...)", measured nothing; a peer that is installed is "skipped" on a
    machine without CUDA."""
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed: import fails, find_spec is None
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    peers = [layer_norm_bench.providers("layer_norm", quick=True)["liger"],
             attention_bench.providers(quick=True)["flex"][0]]
    for peer, hint in zip(peers, ['pip install -e ".[peers]"', "needs torch >= 2.5"]):
        with pytest.raises(common.NotMeasured) as caught:
            peer(*[torch.zeros(1, 1, 4, 8)] * 4)
        assert (caught.value.status, caught.value.note) == ("unsupported", f"not installed ({hint})")

    env = dict(device="cpu", commit="x", date="d")
    table = {"liger": peers[0]}
    rows = layer_norm_bench.run_point("layer_norm", 5, 16, "fp32", table, env, True, "cpu", cuda_graphs=False)
    liger = [r for r in rows if r["provider"] == "liger"]
    assert [(r["mode"], r["status"], r.get("p50")) for r in liger] == [("fwd", "unsupported", None),
                                                                   ("fwd+bwd", "unsupported", None)]
    assert common.peer_unavailable("no_such_package.ops", "pip install it", "why") is not None
    if not torch.cuda.is_available():
        with pytest.raises(common.NotMeasured, match="CUDA only: why") as caught:
            common.peer_unavailable("torch", "pip install torch", "why")()
        assert caught.value.status == "skipped"


def test_layer_norm_check_names_one_wrong_row(monkeypatch):
    """Every row is checked on its own: one row of y off by 3e-4 (fp32) is a mismatch naming that
    row, though the old check, one relative error over the whole tensors, stays under tolerance."""
    ours = layer_norm_bench.providers("layer_norm", quick=True)["ours"]
    scale = torch.ones(33, 1)
    scale[5] = 1 + 3e-4
    table = {"ours": ours, "wrong": lambda x, r, w, b: tuple(o * scale for o in ours(x, r, w, b))}
    seen = []  # (got, ref) of each provider checked, in the table's order
    real_check = layer_norm_bench.check

    def spy(got, ref, names):
        seen.append((got, ref))
        return real_check(got, ref, names)

    monkeypatch.setattr(layer_norm_bench, "check", spy)
    env = dict(device="cpu", commit="x", date="d")
    rows = layer_norm_bench.run_point("layer_norm", 33, 64, "fp32", table, env, True, "cpu", cuda_graphs=False)
    checks = {r["provider"]: r for r in rows if r["metric"] == "rel_err"}
    assert checks["ours"]["status"] == "ok"
    assert checks["wrong"]["status"] == "mismatch"
    assert checks["wrong"]["note"] in ("worst: y, row 5", "worst: dx, row 5")  # dx is scaled with y
    assert {r["status"] for r in rows if r["provider"] == "wrong" and r["metric"] == "time"} == {"mismatch"}
    got, ref = seen[1]  # "wrong"
    assert max(whole_tensor_error(g, r) for g, r in zip(got, ref)) < layer_norm_bench.MISMATCH_TOL[torch.float32]


def test_layer_norm_cuda_graph_rows(monkeypatch):
    """With CUDA graphs (on a GPU) every timed provider and mode also gets time_cudagraph and
    bandwidth_cudagraph rows; one whose capture fails is "unsupported" there and keeps its other
    rows. (measure_cudagraph itself is faked: there are no CUDA graphs on a CPU.)"""
    calls = []

    def fake_cudagraph(fn, grad_to_none=None):
        calls.append(fn)
        if len(calls) == 3:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return 0.5, 0.4, 0.6

    monkeypatch.setattr(common, "measure_cudagraph", fake_cudagraph)
    table = {name: fn for name, fn in layer_norm_bench.providers("layer_norm", quick=True).items() if name != "liger"}
    env = dict(device="cpu", commit="x", date="d")
    rows = layer_norm_bench.run_point("layer_norm", 7, 32, "fp32", table, env, True, "cpu", cuda_graphs=True)
    graphed = {(r["provider"], r["mode"], r["metric"]): r for r in rows if r["metric"].endswith("_cudagraph")}
    nbytes = {"fwd": 2 * 7 * 32 * 4, "fwd+bwd": 5 * 7 * 32 * 4}
    for mode in ("fwd", "fwd+bwd"):
        assert graphed[("ours", mode, "time_cudagraph")]["p50"] == 0.5
        assert graphed[("ours", mode, "bandwidth_cudagraph")]["p50"] == pytest.approx(nbytes[mode] / 0.5 / 1e6)
    failed = graphed[("torch", "fwd", "time_cudagraph")]
    assert failed["status"] == "unsupported" and failed["note"] == "operation not permitted when stream is capturing"
    assert ("torch", "fwd", "bandwidth_cudagraph") not in graphed
    assert graphed[("torch", "fwd+bwd", "time_cudagraph")]["status"] == "ok" and len(calls) == 4


@pytest.mark.requires_cuda
def test_layer_norm_cuda_graphs_on_gpu():
    """The real do_bench_cudagraph over our kernels' forward and forward+backward (autograd included)
    and F.layer_norm's, at a small GPT-2-width point; Liger timed too where it is installed."""
    table = layer_norm_bench.providers("layer_norm", quick=True)  # no torch.compile: minutes
    env = dict(device="gpu", commit="x", date="d")
    rows = layer_norm_bench.run_point("layer_norm", 1024, 768, "bf16", table, env, False, "cuda", cuda_graphs=True)
    assert all(r["status"] == "ok" for r in rows if r["metric"] == "rel_err" and r["provider"] in ("ours", "torch"))
    graphed = {(r["provider"], r["mode"]): r for r in rows if r["metric"] == "time_cudagraph"}
    for provider in ("ours", "torch"):
        for mode in ("fwd", "fwd+bwd"):
            assert graphed[(provider, mode)]["status"] == "ok" and graphed[(provider, mode)]["p50"] > 0


def test_layer_norm_copy_target_uses_the_same_size_copy(tmp_path):
    """The fraction-of-copy target reads ours' fraction at hidden 768, which is over the copy of
    that point's size, and names that copy's bandwidth (not another point's)."""
    from benchmarks import targets

    stamp = dict(benchmark="layer_norm", dtype="bf16", rows=16384, device="GPU X", date="2026-01-01",
                 commit="abc1234", status="ok")
    rows = [dict(stamp, kernel="layer_norm", hidden=768, provider="ours", mode="fwd", metric="bandwidth", p50=2000.0),
            dict(stamp, kernel="layer_norm", hidden=768, provider="ours", mode="fwd", metric="fraction_of_copy",
                 p50=0.8),
            dict(stamp, kernel="layer_norm", hidden=768, provider="copy", mode="copy", metric="bandwidth", p50=2500.0),
            dict(stamp, kernel="layer_norm", hidden=4096, provider="copy", mode="copy", metric="bandwidth", p50=3000.0)]
    common.write_csv(rows, tmp_path / "layer_norm.csv", layer_norm_bench.SHAPE_FIELDS)
    _, _, _, ln_copy, *_ = targets.check(tmp_path)
    assert ln_copy["value"] == 0.8 and ln_copy["measured"] == "ours 2000 GB/s, same-size copy 2500 GB/s"


def test_bad_places_and_files_are_one_line(tmp_path):
    """Output folders that can't be one, a CSV that is not ours, a row too long for our LayerNorm, a
    job count of 0: one line and exit status 2 each, before anything is measured or written."""
    from benchmarks import merge_results, resources, targets

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, fragment in ((["--output_dir", a_file], "is a file, not a directory"),
                           (["--output_dir", a_file / "sub"], "is a file")):
        expect_input_error(layer_norm_bench.main, ["--quick", *argv], "--output_dir", fragment)
    expect_input_error(layer_norm_bench.main, ["--quick", "--output_dir", tmp_path / "ln", "--hidden", "100000"],
                       "--hidden 100000", "at most 16384 elements in fp32")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "layer_norm.csv").write_text("name,score\nx,1,2\n")
    expect_input_error(layer_norm_bench.main, ["--replot", "--output_dir", bad], "is not a results CSV",
                       "no column 'benchmark'")
    (bad / "device").mkdir()
    (bad / "device" / "attention.csv").write_text("benchmark,kernel,provider,mode,dtype\nattention,f,ours,fwd\n")
    expect_input_error(targets.main, ["--results", bad / "device"], "attention.csv is not a results CSV")
    expect_input_error(merge_results.main, [bad, "--into", a_file], "--into", "is a file, not a directory")
    expect_input_error(resources.main, ["--jobs", "0"], "--jobs: must be at least 1, got 0")


def test_training_quick_exits_1_when_every_run_fails(tmp_path):
    from benchmarks import training as training_bench

    # longer rows than the quick model's context: each pretrain.py run refuses them
    assert training_bench.main(["--quick", "--output_dir", str(tmp_path), "--block_size", "64"]) == 1
    rows = read_rows(tmp_path / "training.csv")
    assert {r["status"] for r in rows if r["metric"] == "tokens_per_s"} == {"error"}


def test_training_refuses_a_bad_model_before_any_run(tmp_path):
    from benchmarks import training as training_bench

    expect_input_error(training_bench.main, ["--quick", "--output_dir", str(tmp_path), "--config_overrides",
                                             "n_layers=1"], "--config_overrides n_layers=1: bad override", within=10)
    expect_input_error(training_bench.main, ["--quick", "--output_dir", str(tmp_path), "--vocab_size", "5"],
                       "argument --vocab_size: must be at least 257", within=10)
    assert not (tmp_path / "training_runs").exists()


ENTRY_POINTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                      if 'if __name__ == "__main__":' in p.read_text())


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_reports_input_errors_in_one_line(module):
    """Every benchmark a user can run goes through the one error path: a bad flag is one
    `benchmarks.X: error: ... (see --help)` line and exit status 2, no usage block or traceback."""
    bench = importlib.import_module(f"benchmarks.{module}")
    message = expect_input_error(bench.main, ["--no_such_flag"], "(see --help)")
    assert message.startswith(f"benchmarks.{module}: error: "), message


@pytest.mark.parametrize("module, argv, flag", [
    ("attention", ["--quick"], "--output_dir"),
    ("layer_norm", ["--quick"], "--output_dir"),
    ("training", ["--quick"], "--output_dir"),
    ("overhead", ["--quick"], "--output_dir"),
    ("activation_memory", [], "--output_dir"),
    ("merge_results", ["."], "--into"),
    ("resources", [], "--out"),
])
@pytest.mark.parametrize("place", ["under /proc", "under a file"])
def test_unwritable_output_folder_refused_before_measuring(module, argv, flag, place, monkeypatch, tmp_path):
    """An output folder that can't be created (under /proc, where even root can't make one, or
    under a file) is one line naming the flag, before anything is measured, in every benchmark
    that writes one."""
    if place == "under /proc":
        if not os.path.isdir("/proc"):
            pytest.skip("needs Linux's /proc, where even root can't create a folder")
        folder, fragment = Path("/proc") / f"no-such-{os.getpid()}" / "out", "can't be created or written"
    else:
        (tmp_path / "a_file").write_text("x")
        folder, fragment = tmp_path / "a_file" / "out", "is a file"
    monkeypatch.setattr(common, "environment", lambda: pytest.fail("measured before checking the folder"))
    bench = importlib.import_module(f"benchmarks.{module}")
    expect_input_error(bench.main, [*argv, flag, folder], f"argument {flag}: {folder}", fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_overhead_without_a_gpu_is_one_line():
    """`python -m benchmarks.overhead` (a full run) on a CPU: the InputError is one line, exit 2."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.overhead"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmarks.overhead: error: "), result.stderr
    assert "needs a CUDA GPU" in lines[0]
