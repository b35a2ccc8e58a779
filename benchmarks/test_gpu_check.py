"""The GPU check's own pieces on the CPU: the summary lines it reads off the tables, the FSDP comparison, the probe
driver's dry run and the script's arguments. (`bash benchmarks/gpu_check.sh --dry-run` runs every stage end to end;
it takes minutes, so it is not part of the suite.)"""

import csv
import subprocess
from pathlib import Path

import pytest

import bench_fsdp
import bench_probe_cost
import gpu_summary
import report
from rrhf_fast.prefix import MODES
from test_bench_loss import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)

SCRIPT = Path(__file__).with_name("gpu_check.sh")


def table(tmp_path, name, rows) -> Path:
    return report.write_table(rows, name, "t", report.machine("cpu"), "", tmp_path).with_suffix(".csv")


def step_row(groups, variant, body, prefix_of_ideal="", note=""):
    return {"groups": groups, "variant": variant, "body": body, "head": "full logits, naive" if variant == "original" else "fused",
            "prefix of ideal": prefix_of_ideal, "note": note}  # fmt: skip


def test_step_summary_reads_the_best_share_the_auto_pick_and_what_did_not_run(tmp_path):
    rows = [step_row(8, "original", "re-encode"), step_row(8, "reencode-fused", "re-encode"),
            step_row(8, "ours-packed", "packed (auto)", 0.93), step_row(8, "ours-kv-cache", "kv-cache", 0.61),
            step_row(32, "original", "re-encode", note="OutOfMemoryError: CUDA out of memory"),
            step_row(32, "ours-packed", "packed (auto)", 0.85)]  # fmt: skip
    paths = [table(tmp_path, "step-llama-1b-sdpa-nvidia-h200", rows), table(tmp_path, "sample-cpu", [{"contender": "x"}])]
    line = gpu_summary.summary("step", paths)
    assert line.startswith("prefix of ideal (goal 0.9): llama-1b-sdpa: ")
    eight, thirty_two = line.split(": ", 2)[2].split(" / ")
    assert eight == "8 groups: packed 0.93, kv-cache 0.61; best 0.93, met; auto = packed"
    assert thirty_two == "32 groups: packed 0.85; best 0.85, missed; auto = packed; did not run: original"


def test_loss_sample_and_fsdp_summaries_state_their_goals(tmp_path):
    loss_row = {"N": 8192, "D": 4096, "V": 128256, "ms": 44.6, "x 6NVD floor": 1.18, "x reference memory": 0.217,
                "scratch MiB": 2004.0}  # fmt: skip
    loss = table(tmp_path, "loss-nvidia-h200", [{**loss_row, "provider": "reference"}, {**loss_row, "provider": "triton"},
                                                {**loss_row, "provider": "liger", "x 6NVD floor": 2.21}])  # fmt: skip
    line = gpu_summary.summary("loss", [loss])
    assert "triton 44.6 ms = 1.18x the 6NVD floor, scratch 2004 MiB, memory 0.217 of the reference's (goal 0.02: missed)" in line
    assert "liger 2.21x floor" in line and "no cce row" in line

    sample = table(tmp_path, "sample-nvidia-h200", [
        {"model": "m", "prompt tokens": "64-192", "contender": "ours", "x generate": 1.62, "x loop": 3.0},
        {"model": "m", "prompt tokens": "64-192", "contender": "generate", "x generate": "", "x loop": ""}])  # fmt: skip
    assert gpu_summary.summary("sample", [sample]) == "m, 64-192 prompt tokens: ours 1.62x generate() (goal 1.5: met), 3.00x the loop"

    steps = {"plain": {1: {"loss": 2.0, "tokens_per_s": 100.0, "peak_mem_mb": 10.0}, 2: {"loss": 1.5}},
             "fsdp": {1: {"loss": 2.01, "tokens_per_s": 90.0, "peak_mem_mb": 5.0}}}  # fmt: skip
    rows = bench_fsdp.compare(steps, ["plain", "fsdp"])
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss rel diff"] == pytest.approx(0.005)
    assert rows[1]["loss rel diff"] == "" and rows[1]["loss (fsdp)"] == ""
    line = gpu_summary.summary("fsdp", [table(tmp_path, "fsdp-nvidia-h200", rows)])
    assert line == "1 steps: losses agree to 5.0e-03 relative (step 1: 5.0e-03); last step fsdp / plain tokens/s 0.90, peak MiB 5 / 10"


def test_probe_driver_reads_the_plan_and_times_it(tmp_path):
    path = bench_probe_cost.main(["--dry-run", "--models", "tiny", "--groups", "1", "--out", str(tmp_path)])
    with open(path.with_suffix(".csv"), newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["plan mode"] in MODES and row["plan head"] in ("fused", "logits")
    seconds = [float(row[c]) for c in ("probe s", "first step s", "step s")]
    assert all(s > 0 for s in seconds) and float(row["probe / step"]) == pytest.approx(seconds[0] / seconds[2], rel=1e-3)


def test_script_arguments():
    assert "stage" in subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
