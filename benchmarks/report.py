"""What every benchmark shares: the machine it ran on, timing, memory, and the dated tables it writes.

A figure means nothing without its machine, so every table written here starts with the CPU model and core
count (or the GPU name) and the library versions, and its file name starts with the date.
"""

import csv
import datetime
import gc
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def out_dir(out, dry_run: bool, name: str) -> Path:
    """Where a benchmark writes its tables: --out; else benchmarks/results, or for a dry run a new temporary folder
    (a dry run's tables measure nothing and never land in results/)."""
    if out is not None:
        return Path(out)
    return Path(tempfile.mkdtemp(prefix=f"{name}-dry-run-")) if dry_run else RESULTS


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    """Where the numbers came from: hardware and library versions."""
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "absent"
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"{cpu_model()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    return info


def file_device(device: str) -> str:
    """The device's part of a table's file name: cpu, or the GPU's name in lower case with dashes (nvidia-h200)."""
    return "cpu" if torch.device(device).type == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")


def median_seconds(fn, device: str, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() after warm-up; CUDA work is timed with triton's do_bench (events, flushed L2)."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup * 25, rep=repeats * 100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attempt(failed: dict, name: str, fn):
    """fn(), or None with the reason it could not run in failed[name] (a mode the probe refuses, out of memory, a
    library that breaks at this size): one contender that cannot run at a point must not end a sweep."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001  (the reason goes into the table)
        failed[name] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:240]}"
    gc.collect()  # the traceback's frames held the failed call's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory that one call of fn() adds above what is allocated before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: growth of the resident set's high-water mark (VmHWM), reset
    through /proc/self/clear_refs; call it in a fresh process per provider so that one provider's freed pages
    (kept by the allocator) do not hide another's.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    fn()
    return (_rss_kib("VmHWM") - before) * 1024


def write_table(rows: list[dict], name: str, title: str, info: dict, notes: str = "", out_dir: Path = RESULTS) -> Path:
    """Write `<date>-<name>.md` and `.csv` under out_dir; returns the Markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{info['date']}-{name}"
    columns = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
