"""What every benchmark shares: the environment stamp, timing, the long-format CSV, the Markdown
summary and the plots.

Long format: one row per (point, provider, mode, metric), so anyone can re-plot with pandas.
A point that could not be measured keeps its row with status "oom", "unsupported" (cannot run
here: an optional peer not installed, a shape it refuses), "skipped" (could run, but not usefully:
CUDA-only on a CPU, a shape too large to be worth its time) or "mismatch", a note saying why, and
empty numbers, never a zero.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2.errors import InputError
from gpt2.files import atomic_write, atomic_write_text, check_writable_dir
from gpt2.provenance import git_commit

ROOT = Path(__file__).resolve().parent.parent
LEADING_FIELDS = ["benchmark", "kernel", "provider", "mode", "dtype"]
TRAILING_FIELDS = [
    "metric", "unit", "p50", "p20", "p80", "status", "note", "sdpa_backend", "device", "torch", "triton", "commit",
    "date",
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def environment() -> dict:
    """Device, library versions, git commit and date: stamped on every row. GIT_COMMIT, when set,
    names the commit (for a copied tree without .git, as on a lent GPU machine)."""
    import triton

    commit = git_commit()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (triton interpreter)"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


# The aten op scaled_dot_product_attention dispatches to, by a part of its name, and the backend it is.
_SDPA_OPS = (("cudnn", "cudnn"), ("flash_attention_for_cpu", "flash-cpu"), ("flash", "flash"),
             ("efficient", "efficient"), ("overrideable", "fused-other"), ("math", "math"))


def sdpa_backend(q, k, v, attn_mask=None, is_causal: bool = False) -> str:
    """The backend PyTorch's scaled_dot_product_attention picks for these inputs by default (no
    sdpa_kernel context), read off the aten op one call dispatches to, so that a row measured
    with "sdpa" says what ran: on sm_90 with torch 2.11 cuDNN, on a CPU its own flash kernel."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                       enable_gqa=q.shape[1] != k.shape[1])
    names = [e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")]
    return next((backend for part, backend in _SDPA_OPS if any(part in n for n in names)), "unknown")


def device_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def writable_dir(text: str) -> Path:
    """An argparse type for an output folder: one this process can create or write into
    (gpt2.files.check_writable_dir). An unusable folder is a bad flag (one line, exit status 2),
    refused before anything is measured, not when the first result is written."""
    try:
        return check_writable_dir(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def start_run(quick: bool, requested_dir: str | os.PathLike | None) -> tuple[dict, Path]:
    """The start of every measuring run, once its flags are checked: the full sweep needs a GPU;
    --quick without one runs the kernels through the Triton interpreter, which must be switched on
    before triton loads. Returns the environment stamp and the output folder."""
    if not torch.cuda.is_available():
        if not quick:
            raise InputError("the full benchmark needs a CUDA GPU (none here): run with --quick for a CPU smoke "
                             "run through the Triton interpreter")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    env = environment()
    return env, output_dir(requested_dir, env, quick)


def measure(fn, quick: bool, grad_to_none=None) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile milliseconds of fn().

    On a GPU: triton.testing.do_bench (CUDA events, L2 flushed between runs). In --quick mode on
    CPU the interpreter's times mean nothing; one wall-clock run just exercises the path.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
        return p50, p20, p80
    start = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - start) * 1e3
    return elapsed, elapsed, elapsed


def measure_cudagraph(fn, grad_to_none=None) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile milliseconds of fn() replayed from a CUDA graph
    (triton.testing.do_bench_cudagraph: some 20 ms of calls captured in one graph, so the host's
    launch cost is left out, which a kernel of 10 to 20 µs is not far above). CUDA only. There is no
    L2 flush between the calls: where a point's tensors fit in L2, part of its reads may hit there."""
    from triton.testing import do_bench_cudagraph

    p50, p20, p80 = do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return p50, p20, p80


def peak_memory_mb(fn) -> float | None:
    """Peak device memory fn() allocates above what was already allocated, in MB (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def worst_relative_error(out: torch.Tensor, ref: torch.Tensor, lead: int) -> tuple[float, tuple[int, ...]]:
    """The largest ||out - ref|| / ||ref|| over the slices that fix the first `lead` indices (lead=1:
    each row; lead=2: each (batch element, head); lead=0: the whole tensor), in float64, and the
    index of that slice. One wrong slice is not averaged away, as it is in a norm over the whole
    tensor (one head in 32 off by 10% moves that by under 2%). NaN counts as infinitely wrong."""
    out, ref = out.double(), ref.double()
    dims = tuple(range(lead, ref.dim()))
    errors = torch.linalg.vector_norm(out - ref, dim=dims) / torch.linalg.vector_norm(ref, dim=dims).clamp_min(1e-300)
    errors = errors.nan_to_num(nan=math.inf)
    worst = errors.argmax()
    return errors.reshape(-1)[worst].item(), tuple(int(i) for i in torch.unravel_index(worst, errors.shape))


class NotMeasured(Exception):
    """Raised by a provider that is not measured at a point, with the status its rows get
    ("unsupported" or "skipped", as in the module docstring) and a note saying why."""

    def __init__(self, status: str, note: str):
        super().__init__(note)
        self.status, self.note = status, note


def not_measured(status: str, note: str):
    """A provider that is never measured here: calling it raises NotMeasured(status, note)."""

    def provider(*args, **kwargs):
        raise NotMeasured(status, note)

    return provider


def peer_unavailable(module: str, install: str, why_cuda_only: str):
    """For an optional peer provider (another project's kernel, CUDA only): a stand-in provider
    when it cannot be measured here, else None. "unsupported" when `module` is not installed
    (found without importing it), "skipped" on a machine without CUDA."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        return not_measured("unsupported", f"not installed ({install})")
    if not torch.cuda.is_available():
        return not_measured("skipped", f"CUDA only: {why_cuda_only}")
    return None


def untimed(row: dict, modes, status: str, note: str | None = None) -> list[dict]:
    """A provider's rows at a point where it was not timed: one empty "time" row per mode, with
    the status and the note saying why."""
    return [dict(row, mode=m, metric="time", unit="ms", status=status, note=note) for m in modes]


def write_csv(rows: list[dict], path: Path, shape_fields: list[str]) -> None:
    """Long format: the leading fields, the benchmark's shape fields, then metric, numbers, stamp.
    Written to a temporary file and renamed, so a run killed mid-write leaves the previous file."""
    fields = LEADING_FIELDS + shape_fields + TRAILING_FIELDS
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})

    atomic_write(path, write)


def read_csv(path: Path, shape_fields: list[str]) -> list[dict]:
    """Rows as write_csv wrote them, with the shape fields and numbers back as int/float and
    empty cells as None. A missing file reads as no rows."""
    if not path.exists():
        return []
    numeric = set(shape_fields) | {"p50", "p20", "p80"}

    def parse(key, value):
        if value == "":
            return None
        if key not in numeric:
            return value
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value

    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [k for k in LEADING_FIELDS + shape_fields if k not in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path} can't be read as a results CSV ({err})") from None
    ragged = next((i for i, row in enumerate(rows, start=2) if None in row or None in row.values()), None)
    if missing or ragged:
        what = f"no column {missing[0]!r}" if missing else f"line {ragged} has another number of cells than the header"
        raise InputError(f"{path} is not a results CSV of this benchmark ({what}); move it aside or delete it")
    return [{k: parse(k, v) for k, v in row.items()} for row in rows]


def save_rows(rows: list[dict], path: Path, shape_fields: list[str], point_fields: list[str]) -> list[dict]:
    """Merge this run's rows into the CSV at `path` and return everything it now holds: rows of
    an earlier run for points this run measured (same point_fields) are replaced, the others kept.
    So a sweep can be split over several runs, each under a time limit, and saved after every
    point: a run that is killed keeps what it measured. Delete the file to start afresh."""

    def point(row):
        return tuple("" if row.get(f) is None else str(row[f]) for f in point_fields)

    measured = {point(r) for r in rows}
    merged = [r for r in read_csv(path, shape_fields) if point(r) not in measured] + rows
    write_csv(merged, path, shape_fields)
    return merged


def replot(output_dir: str | None, name: str, shape_fields: list[str], summarize) -> int:
    """--replot: rebuild <name>.md and the plots from <name>.csv in output_dir, measuring nothing
    (e.g. after a GPU run whose time limit cut it short, or on a machine without a GPU)."""
    if not output_dir:
        raise InputError(f"--replot needs --output_dir, the folder holding {name}.csv")
    out_dir = Path(output_dir)
    if not out_dir.is_dir():
        raise InputError(f"--output_dir {out_dir}: no such folder (--replot reads {name}.csv there)")
    rows = read_csv(out_dir / f"{name}.csv", shape_fields)
    if not rows:
        raise InputError(f"no rows in {out_dir / f'{name}.csv'}")
    print(write_summary(name, rows, out_dir, summarize))
    return 0


def write_summary(name: str, rows: list[dict], out_dir: Path, summarize) -> str:
    """<name>.md (and its plots) in out_dir, rebuilt from rows; returns the Markdown."""
    summary = summarize(rows, out_dir)
    atomic_write_text(out_dir / f"{name}.md", summary)
    return summary


def stamp(rows: list[dict]) -> str:
    """Date, versions and commit of the rows, one clause per distinct run."""
    runs = dict.fromkeys((r.get("date"), r.get("torch"), r.get("triton"), r.get("commit")) for r in rows
                         if r.get("date"))
    return "; ".join(f"{d}, torch {t}, triton {tr}, commit {c}" for d, t, tr, c in runs) + "."


def fmt(value, digits=3) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(header: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(v) for v in line) + " |" for line in lines]
    return "\n".join(out)


def plot_lines(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               path: Path, logx: bool = True) -> bool:
    """One line per provider. Returns False (and draws nothing) when there are no points or
    matplotlib isn't installed."""
    if not any(series.values()):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in series.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def output_dir(arg: str | os.PathLike | None, env: dict, quick: bool) -> Path:
    """--output_dir (checked as it was parsed: type=writable_dir), or benchmarks/results/<device>/
    for a full run; a quick run must name its own place (or gets benchmarks/results/quick-<device>/,
    which is not committed)."""
    if arg:
        return Path(arg)
    slug = device_slug(env["device"])
    return ROOT / "benchmarks" / "results" / (f"quick-{slug}" if quick else slug)
