"""The tests a GPU is needed for, in one pytest run, with a dated table of every test's outcome and seconds.

The selection: tests/test_kernels.py whole (on a GPU it compiles every Triton kernel at the trainer's shapes, k = 2,
4, 8, 16, bf16 and fp32, V = 32000 / 128256 / 151936, and runs the interpreter-sized cases on the GPU too) and every
test of tests/ and benchmarks/ marked `cuda`, the slow ones included. Without a GPU the same selection runs the
kernels through the Triton interpreter (the root conftest sets TRITON_INTERPRET=1) and skips the cuda-marked tests.
A test module that cannot be imported (a library the machine lacks) is a row, not the end of the run.

    python benchmarks/gpu_tests.py                           # results/<date>-gpu-tests-<device>.md and .csv
    python benchmarks/gpu_tests.py --dry-run --out /tmp/x    # the table elsewhere

The last line counts the outcomes; the exit status is pytest's (0: no failure).
"""

import argparse
import collections
import os
import sys
from pathlib import Path

import pytest
import torch

import report

ROOT = Path(__file__).resolve().parent.parent


class Selection:
    """A pytest plugin: keeps test_kernels.py and the cuda-marked tests, and records every test's outcome."""

    def __init__(self):
        self.rows = []

    def pytest_collection_modifyitems(self, config, items):
        keep = [item for item in items if item.path.name == "test_kernels.py" or item.get_closest_marker("cuda")]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep

    def pytest_runtest_logreport(self, report):
        # one row a test: its call, or the setup that failed or skipped it
        if report.when == "call" or (report.when == "setup" and not report.passed):
            detail = "" if report.passed else (report.longreprtext.strip().splitlines() or [""])[-1][:200]
            self.rows.append({"test": report.nodeid, "outcome": report.outcome, "seconds": report.duration, "detail": detail})

    def pytest_collectreport(self, report):
        if report.failed:
            detail = (report.longreprtext.strip().splitlines() or [""])[-1][:200]
            self.rows.append({"test": report.nodeid, "outcome": "error", "seconds": 0.0, "detail": detail})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for the dated table (default benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true", help="the table to --out or a new temporary folder")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --), e.g. -x")
    args = parser.parse_args(argv)
    out = report.out_dir(args.out, args.dry_run, "gpu_tests")
    selection = Selection()
    os.chdir(ROOT)  # the root conftest and pyproject's pytest settings
    status = pytest.main(
        ["tests", "benchmarks", "-q", "-m", "cuda or not slow", "-p", "no:cacheprovider", "--continue-on-collection-errors",
         *args.pytest_args],
        plugins=[selection],
    )  # fmt: skip
    counts = collections.Counter(row["outcome"] for row in selection.rows)
    line = ", ".join(f"{counts[o]} {o}" for o in ("passed", "failed", "skipped", "error"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = report.machine(device)
    where = report.file_device(device)
    command = " ".join(["python benchmarks/gpu_tests.py", *(sys.argv[1:] if argv is None else argv)])
    notes = (f"Command: `{command}`: tests/test_kernels.py and every test marked cuda. {line}; pytest's exit status "
             f"{int(status)}." + ("" if device == "cuda" else " No CUDA device: the kernels ran through the Triton "
                                  "interpreter and the cuda-marked tests were skipped."))  # fmt: skip
    rows = selection.rows or [{"test": "(none collected)", "outcome": "error", "seconds": 0.0, "detail": ""}]
    path = report.write_table(rows, f"gpu-tests-{where}", "GPU check: the CUDA tests and the kernel tests", info, notes, out)
    print(f"wrote {path}")
    print(f"gpu tests: {line}")
    return int(status)


if __name__ == "__main__":
    raise SystemExit(main())
