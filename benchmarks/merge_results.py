"""Merge results unpacked from separate GPU calls into benchmarks/results/, then rebuild the
summaries and plots.

    mkdir -p /tmp/call2 && tar -xzf results.tar.gz -C /tmp/call2
    python -m benchmarks.merge_results /tmp/call2/benchmarks/results

Every <device>/<benchmark>.csv under the given folders is merged into the same file here: a point
present in both keeps the given folder's rows (the later run), the rest is kept from both. The
logs folder is copied over. Needs no GPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/merge_results.py): the checkout goes on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import attention, common, layer_norm, training
from gpt2.errors import ArgumentParser, InputError, exit_on_input_error

BENCHMARKS = {"attention": attention, "layer_norm": layer_norm, "training": training}
RESULTS = common.ROOT / "benchmarks" / "results"


def merge(source: Path, dest: Path = RESULTS) -> list[Path]:
    """Merge source/<device>/*.csv into dest/<device>/; returns the device folders touched."""
    touched = []
    for device_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        target = dest / device_dir.name
        if device_dir.name == "logs":
            shutil.copytree(device_dir, target, dirs_exist_ok=True)
            continue
        for name, module in BENCHMARKS.items():
            rows = common.read_csv(device_dir / f"{name}.csv", module.SHAPE_FIELDS)
            if rows:
                common.save_rows(rows, target / f"{name}.csv", module.SHAPE_FIELDS, module.POINT_FIELDS)
                merged = common.read_csv(target / f"{name}.csv", module.SHAPE_FIELDS)
                common.write_summary(name, merged, target, module.summarize)
                touched.append(target)
    return list(dict.fromkeys(touched))


def main(argv=None) -> int:
    with exit_on_input_error("benchmarks.merge_results"):
        return run(parse_args(argv))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", type=Path, nargs="+", help="unpacked benchmarks/results folders")
    parser.add_argument("--into", type=common.writable_dir, default=RESULTS)
    return parser.parse_args(argv)


def check_source(source: Path) -> None:
    """A folder to merge from holds <device>/<benchmark>.csv: checked for every folder before any is merged."""
    if not source.is_dir():
        raise InputError(f"no folder {source}: give the unpacked benchmarks/results folder")
    if not any(path.is_file() for name in BENCHMARKS for path in source.glob(f"*/{name}.csv")):
        raise InputError(f"no benchmark CSVs in {source}/<device>/: give the unpacked benchmarks/results folder")


def run(args) -> int:
    for source in args.sources:
        check_source(source)
    for source in args.sources:
        for folder in merge(source, args.into):
            print(f"merged {source} into {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
