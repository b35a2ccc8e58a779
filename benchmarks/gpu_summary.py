"""One line for a stage of the GPU check, read from the tables (CSV) the stage wrote: the figures against their goals.

    python benchmarks/gpu_summary.py loss results/2026-12-02-loss-nvidia-h200.csv results/...-loss-autocast-....csv

The stages and their goals (benchmarks/gpu_check.sh runs them): versions; tests (no failure); loss (the fused head's
time against the 6NVD floor, its memory against the reference's: goal 1/50, also inside a training step); probe (its
plan and its cost in training steps); step and prefix (the fraction of the ideal prefix speedup: goal 0.9, and the
mode auto picks); sample (ours against generate(): goal 1.5x); fsdp (FSDP2 --bf16 against the run without it).
"""

import csv
import math
import re
import sys
from pathlib import Path

PREFIX_GOAL, SAMPLE_GOAL, MEMORY_GOAL = 0.9, 1.5, 1 / 50


def number(text):
    """A table cell as a float, or None where it is blank or not a number."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def label(path: Path, kind: str) -> str:
    """The part of a table's name between its kind and the device: step-<label>-<device> -> label."""
    name = re.sub(r"^\d{4}-\d{2}-\d{2}-", "", path.stem)
    rest = name[len(kind) + 1 :] if name.startswith(kind + "-") else name
    return rest.rsplit("-nvidia", 1)[0].rsplit("-cpu", 1)[0] or kind


def versions(tables: dict) -> str:
    rows = [r for rows in tables.values() for r in rows]
    found = "; ".join(f"{r['what']} {r['found']}" + ("" if r["verdict"] == "ok" else f" ({r['verdict']})") for r in rows)
    return found or "no table"


def tests(tables: dict) -> str:
    rows = [r for rows in tables.values() for r in rows]
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "skipped", "error")}
    failing = [r["test"] for r in rows if r["outcome"] in ("failed", "error")]
    line = ", ".join(f"{n} {o}" for o, n in counts.items())
    return line + (f"; failing: {', '.join(failing[:5])}" + (" ..." if len(failing) > 5 else "") if failing else "")


def loss(tables: dict) -> str:
    parts = []
    for path, rows in tables.items():
        in_step = "autocast" in path.name
        n = max((int(r["N"]) for r in rows), default=0)
        at = {r["provider"]: r for r in rows if int(r["N"]) == n}
        fused = at.get("triton") or at.get("torch")
        if fused is None:
            parts.append(f"{path.name}: no fused row")
            continue
        memory, scratch = number(fused["x reference memory"]), number(fused["scratch MiB"])
        where = "in a training step (fp32 master weight, bf16 autocast)" if in_step else f"N={n}, D={fused['D']}, V={fused['V']}"
        text = (f"{where}: {fused['provider']} {number(fused['ms']):.1f} ms = {number(fused['x 6NVD floor']):.2f}x the "
                f"6NVD floor, scratch {scratch:.0f} MiB")  # fmt: skip
        if memory is not None:
            text += f", memory {memory:.3f} of the reference's (goal {MEMORY_GOAL:.2f}: {'met' if memory <= MEMORY_GOAL else 'missed'})"
        if not in_step:
            peers = [f"{p} {number(at[p]['x 6NVD floor']):.2f}x floor" if p in at else f"no {p} row (absent or failed: the "
                     "table's notes say which)" for p in ("liger", "cce")]
            text += "; " + ", ".join(peers)
        parts.append(text)
    return " | ".join(parts) or "no table"


def probe(tables: dict) -> str:
    rows = [r for rows in tables.values() for r in rows]
    return "; ".join(
        f"{r['model']}: {r['plan mode']} with the {r['plan head']} head, probe {number(r['probe s']):.2f} s = "
        f"{number(r['probe / step']):.1f} steps" + ("" if r["plan reason"] == "(first choice)" else f" ({r['plan reason'][:120]})")
        for r in rows
    ) or "no table"


def step(tables: dict) -> str:
    parts = []
    for path, rows in tables.items():
        points = []
        for groups in dict.fromkeys(r["groups"] for r in rows):
            mine = [r for r in rows if r["groups"] == groups]
            auto = next((r for r in mine if r["body"].endswith("(auto)") and r["head"] == "fused"), None)
            shares = {r["body"].split()[0]: number(r["prefix of ideal"]) for r in mine if number(r["prefix of ideal"]) is not None}
            text = f"{groups} groups: " + (", ".join(f"{b} {v:.2f}" for b, v in shares.items()) or "no prefix figure")
            if shares:
                text += f"; best {max(shares.values()):.2f}, {'met' if max(shares.values()) >= PREFIX_GOAL else 'missed'}"
            if auto is not None:
                text += f"; auto = {auto['body'].split()[0]}"
            failed = [r["variant"] for r in mine if r.get("note")]
            points.append(text + (f"; did not run: {', '.join(failed)}" if failed else ""))
        parts.append(f"{label(path, 'step')}: " + " / ".join(points))
    return f"prefix of ideal (goal {PREFIX_GOAL}): " + " | ".join(parts) if parts else "no table"


def prefix(tables: dict) -> str:
    parts = []
    for path, rows in tables.items():
        shares = [f"{r['mode']} {number(r['of ideal']):.2f}" if number(r["of ideal"]) is not None else f"{r['mode']} did not run"
                  for r in rows[1:]]  # fmt: skip
        parts.append(f"{label(path, 'prefix')}: " + ", ".join(shares))
    return f"body alone, of ideal (goal {PREFIX_GOAL}): " + " | ".join(parts) if parts else "no table"


def sample(tables: dict) -> str:
    rows = [r for rows in tables.values() for r in rows if r["contender"] == "ours"]
    return "; ".join(
        f"{r['model']}, {r['prompt tokens']} prompt tokens: ours {number(r['x generate']):.2f}x generate() (goal "
        f"{SAMPLE_GOAL}: {'met' if number(r['x generate']) >= SAMPLE_GOAL else 'missed'}), {number(r['x loop']):.2f}x the loop"
        for r in rows
    ) or "no table"


def fsdp(tables: dict) -> str:
    rows = [r for rows in tables.values() for r in rows if number(r.get("loss rel diff")) is not None]
    if not rows:
        return "no step of both runs logged"
    diffs = [number(r["loss rel diff"]) for r in rows]
    last = rows[-1]
    speed = [number(last.get(f"tokens/s ({n})")) for n in ("plain", "fsdp")]
    peak = [number(last.get(f"peak MiB ({n})")) for n in ("plain", "fsdp")]
    return (f"{len(rows)} steps: losses agree to {max(diffs):.1e} relative (step 1: {diffs[0]:.1e}); last step fsdp / "
            f"plain tokens/s {speed[1] / speed[0]:.2f}, peak MiB {peak[1]:.0f} / {peak[0]:.0f}")  # fmt: skip


STAGES = {"versions": versions, "tests": tests, "loss": loss, "probe": probe, "step": step, "prefix": prefix,
          "sample": sample, "fsdp": fsdp}  # fmt: skip


# the name each kind's tables have after their date: <date>-<name>-...csv
TABLE_NAMES = {"versions": "gpu-versions", "tests": "gpu-tests", "loss": "loss", "probe": "probe", "step": "step",
               "prefix": "prefix", "sample": "sample", "fsdp": "fsdp"}  # fmt: skip


def summary(kind: str, paths: list[Path]) -> str:
    """The line of one kind of table (STAGES' keys) from those of `paths` it applies to (by name)."""
    name = TABLE_NAMES[kind] + "-"
    tables = {p: read(p) for p in sorted(paths) if p.suffix == ".csv" and re.sub(r"^\d{4}-\d{2}-\d{2}-", "", p.name).startswith(name)}
    try:
        return STAGES[kind](tables)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        return f"tables unreadable ({type(err).__name__}: {err})"


if __name__ == "__main__":
    print(summary(sys.argv[1], [Path(p) for p in sys.argv[2:]]))
