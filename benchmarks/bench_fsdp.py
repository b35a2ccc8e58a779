"""torchrun with FSDP2 against the same run without it: `rrhf_fast.train --fsdp --bf16` (bf16 compute over fp32
shards, FSDP2's MixedPrecisionPolicy; NCCL on CUDA, gloo on the CPU) and `rrhf_fast.train --bf16` (bf16 autocast),
each under `torchrun --standalone --nproc_per_node N`, step by step.

Both train the embedded task with an embedded Llama of --hidden and --layers for --steps steps, a metrics line a step
and no checkpoint but final/; each run has --run-timeout seconds (then torchrun is stopped, so a hung collective
cannot eat the rest). Reported a row a step: the loss, gradient norm, tokens/s and peak memory of
both runs and the loss's relative difference (both compute in bf16, so they agree to bf16 rounding, about 1e-2, not
exactly); the notes hold each run's exit status, wall time and the probe's plan. The exit status is 1 when a run
failed.

    python benchmarks/bench_fsdp.py --device cuda                  # results/<date>-fsdp-<gpu>.md and .csv
    python benchmarks/bench_fsdp.py --dry-run --out /tmp/x         # the CPU over gloo: the default tiny Llama, 3 steps
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import report

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"plain": [], "fsdp": ["--fsdp"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun --nproc_per_node)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of each run")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the embedded Llama (a multiple of 8)")
    p.add_argument("--layers", type=int, default=8, help="layers of the embedded Llama")
    p.add_argument("--batch-size", type=int, default=64, help="queries a micro-batch a process")
    p.add_argument("--run-timeout", type=float, default=120, help="seconds each run may take")
    p.add_argument("--work-dir", default=None, help="where the runs' output directories go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="folder for the dated table (default benchmarks/results)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU over gloo: the default tiny Llama (hidden 96, 2 "
                   "layers), 3 steps of 16 queries; table to --out (default: a new temporary folder)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.steps, args.hidden, args.layers, args.batch_size = "cpu", 3, 96, 2, 16
    args.out = report.out_dir(args.out, args.dry_run, "bench_fsdp")
    return args


def command(args, extra: list[str], output_dir: str) -> list[str]:
    """The torchrun command line of one run."""
    train = ["--device", args.device, "--bf16", "--max-steps", str(args.steps), "--log-every", "1", "--save-every", "0",
             "--batch-size", str(args.batch_size), "--task-train-size", str(args.batch_size * args.nproc * args.steps),
             "--task-eval-size", "16", "--eval-max-examples", "16", "--tiny-hidden-size", str(args.hidden),
             "--tiny-layers", str(args.layers), "--output-dir", output_dir, "--overwrite-output-dir", *extra]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "-m", "rrhf_fast.train", *train]  # fmt: skip


def run(cmd: list[str], timeout: float, log_path: Path) -> tuple[int | str, float]:
    """(exit status, or "timed out"; seconds). On timeout torchrun gets SIGTERM, which it passes to its workers, and
    SIGKILL 10 s later; the run stays in this process's group, so whatever ends this process (the GPU check's time
    limit) ends the run's processes too."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            status = "timed out"
    return status, time.time() - start


def read_run(output_dir: Path) -> tuple[dict, dict]:
    """({step: its metrics.jsonl train row}, summary.json or {})."""
    metrics = output_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    summary = output_dir / "summary.json"
    return {r["step"]: r for r in rows if r["type"] == "train"}, json.loads(summary.read_text()) if summary.exists() else {}


def compare(steps: dict, runs: list[str]) -> list[dict]:
    """A row a step: each run's loss, gradient norm, tokens/s and peak MiB, and the losses' relative difference."""
    rows = []
    for step in sorted(set().union(*(steps[name] for name in runs))):
        row = {"step": step}
        for name in runs:
            r = steps[name].get(step, {})
            for key, column in (("loss", "loss"), ("grad_norm", "grad norm"), ("tokens_per_s", "tokens/s"),
                                ("peak_mem_mb", "peak MiB")):  # fmt: skip
                row[f"{column} ({name})"] = r.get(key, "")
        a, b = (steps[name].get(step, {}).get("loss") for name in runs)
        row["loss rel diff"] = abs(a - b) / max(abs(a), 1e-12) if a is not None and b is not None else ""
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_fsdp-"))
    steps, notes, failed = {}, [], False
    for name, extra in RUNS.items():
        output_dir = work / name
        cmd = command(args, extra, str(output_dir))
        status, seconds = run(cmd, args.run_timeout, work / f"{name}.log")
        steps[name], summary = read_run(output_dir)
        failed |= status != 0
        plan = f"plan {summary.get('prefix_mode')} / {summary.get('head')}, probe {summary.get('probe_s', float('nan')):.2f} s"
        notes.append(f"{name} (`torchrun ... -m rrhf_fast.train {' '.join(cmd[cmd.index('rrhf_fast.train') + 1:])}`): "
                     f"exit {status} after {seconds:.1f} s, {len(steps[name])} steps logged, {plan}; log {work / f'{name}.log'}")  # fmt: skip
        print(notes[-1], flush=True)
        if status != 0:
            print((work / f"{name}.log").read_text()[-3000:], flush=True)
    rows = compare(steps, list(RUNS)) or [{"step": "", "note": "no step logged by either run"}]
    for row in rows:
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    info = report.machine("cuda" if args.device.startswith("cuda") else "cpu")
    where = report.file_device(args.device)
    text = ("A dry run (tiny sizes on the CPU, gloo): the figures measure nothing. " if args.dry_run else "") + (
        f"{args.nproc} process(es), embedded Llama hidden {args.hidden}, {args.layers} layers, {args.batch_size} queries "
        f"a micro-batch a process, {args.device}. " + " ".join(f"{n}." for n in notes)
        + " `loss rel diff`: |plain - fsdp| / |plain| at that step (bf16 rounding: about 1e-2).")  # fmt: skip
    path = report.write_table(rows, f"fsdp-{where}", "torchrun: FSDP2 --bf16 against the same run without --fsdp", info,
                              text, args.out)  # fmt: skip
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
