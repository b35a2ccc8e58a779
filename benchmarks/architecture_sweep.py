"""Every decoder-only causal-LM family of the installed transformers, built tiny in float64, through
rrhf_fast.model_loss in every mode of rrhf_fast.prefix.MODES, with and without gradient checkpointing, against
each candidate re-encoded alone through the model's own logits (tests/tiny_models.py has the builders and the
check). Writes benchmarks/results/<date>-architectures.md:

    python benchmarks/architecture_sweep.py                  # every family
    python benchmarks/architecture_sweep.py llama mamba      # some

A verdict is "exact" (loss and every parameter gradient within 1e-6 relative), "refused (message)" (a ValueError
naming a mode), "WRONG (worst relative error, where)" or "error (exception)".
"""

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models  # noqa: E402
from rrhf_fast import probe  # noqa: E402
from rrhf_fast.batch import pack_batch  # noqa: E402
from rrhf_fast.prefix import MODES  # noqa: E402

CASE_SECONDS = 60
RESULTS = Path(__file__).resolve().parent / "results"


def _short(text: str, width: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 3] + "..."


def sweep_family(family: str) -> dict:
    """{"structure": ..., "build_s": ..., (mode, checkpointing): (verdict, detail)} or {"not built": reason}."""
    try:
        model, seconds = tiny_models.build(family)
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return {"not built": f"{type(e).__name__}: {e}"}
    row = {"class": type(model).__name__, "structure": tiny_models.structure(model), "build_s": seconds}
    groups = tiny_models.probe_groups()
    try:
        with tiny_models.time_limit(CASE_SECONDS):
            row["errors"] = {path: err for path, (err, _) in probe.path_errors(model, pack_batch(*groups)).items()}
    except Exception as e:  # noqa: BLE001 - the model cannot even re-encode
        row["errors"] = {"error": f"{type(e).__name__}: {e}"}
    for checkpointing in (False, True):
        if checkpointing:
            try:
                tiny_models.enable_checkpointing(model)
            except Exception as e:  # noqa: BLE001
                for mode in MODES:
                    row[mode, True] = ("n/a", f"{type(e).__name__}: {e}")
                continue
        try:
            with tiny_models.time_limit(CASE_SECONDS):
                expected = tiny_models.reencoded_loss_and_grads(model, groups)
        except Exception as e:  # noqa: BLE001 - the model cannot even re-encode
            for mode in MODES:
                row[mode, checkpointing] = ("n/a", f"reference failed: {type(e).__name__}: {e}")
            continue
        for mode in MODES:
            try:
                with tiny_models.time_limit(CASE_SECONDS):
                    row[mode, checkpointing] = tiny_models.check_mode(model, mode, groups, expected)
            except TimeoutError as e:
                row[mode, checkpointing] = ("error", f"TimeoutError: {e}")
    return row


def _cell(verdict_detail) -> str:
    verdict, detail = verdict_detail
    if verdict == "exact":
        return "exact"
    return f"{verdict} ({_short(detail, 70)})"


PATHS = ("fused head", "packed", "kv-cache", "none")


def _error_cell(errors: dict) -> str:
    if "error" in errors:
        return _short(errors["error"], 60)
    return ", ".join(f"{p.split()[0]} {errors[p]:.0e}" if math.isfinite(errors[p]) else f"{p.split()[0]} -" for p in PATHS if p in errors)


def margin(rows: dict) -> list[str]:
    """The margin between rounding and structure: every error the check measured, with the bound between them."""
    measured = [(err, family, path) for family, row in rows.items() for path, err in row.get("errors", {}).items()
                if path in PATHS and math.isfinite(err)]  # fmt: skip
    below = max((m for m in measured if m[0] <= probe.TOLERANCE), default=None)
    above = min((m for m in measured if m[0] > probe.TOLERANCE), default=None)
    decades = {}
    for err, _, _ in measured:
        decade = math.floor(math.log10(err)) if err > 0 else -17
        decades[decade] = decades.get(decade, 0) + 1
    lines = [f"Errors the check measured (probe.path_errors, every path run as it is, even where the check leaves it "
             f"out by construction; {len(measured)} values): largest at or below TOLERANCE = {probe.TOLERANCE:g}: "
             + (f"{below[0]:.2g} ({below[1]}, {below[2]})" if below else "none")
             + "; smallest above: " + (f"{above[0]:.2g} ({above[1]}, {above[2]})" if above else "none")
             + (f"; margin {above[0] / below[0]:.3g}x" if below and above and below[0] > 0 else "") + ".",  # fmt: skip
             "",
             "| error in | " + " | ".join(f"[1e{d}, 1e{d + 1})" if d > -17 else "0" for d in sorted(decades)) + " |",
             "|---" * (len(decades) + 1) + "|",
             "| paths | " + " | ".join(str(decades[d]) for d in sorted(decades)) + " |"]  # fmt: skip
    return lines


def write_table(rows: dict, seconds: float, path: Path) -> None:
    built = {f: r for f, r in rows.items() if "not built" not in r}
    cases = [v for r in built.values() for k, v in r.items() if isinstance(k, tuple)]
    counts = {v: sum(1 for c in cases if c[0] == v) for v in ("exact", "refused", "WRONG", "error", "n/a")}
    wrong_families = sorted(f for f, r in built.items() if any(isinstance(k, tuple) and v[0] == "WRONG" for k, v in r.items()))
    error_families = sorted(f for f, r in built.items() if any(isinstance(k, tuple) and v[0] == "error" for k, v in r.items()))
    modes = list(MODES)
    lines = [
        f"# Every causal-LM family through model_loss: {datetime.date.today():%Y-%m-%d}",
        "",
        f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, CPU, float64; "
        f"`python benchmarks/architecture_sweep.py` took {seconds:.0f} s on {os.cpu_count()} cores "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}).",
        "",
        "Each family of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES is built tiny (tests/tiny_models.py): 32 wide, one layer of "
        "each kind its config lists (at least two), 4 heads, vocabulary 113, windows, chunks and top-k of 4. The probe "
        "batch has two groups (k = 2 and 3, prompts of 9 and 7 tokens, candidates of 1 to 8 tokens). Reference: each "
        "candidate re-encoded alone, unpadded, through `model(input_ids).logits`, the loss by "
        "rrhf_fast.reference.rrhf_loss_from_logits, gradients by autograd. A cell is `exact` (loss and every "
        "parameter gradient within 1e-6 relative), `refused` (a ValueError naming a mode), `WRONG` (worst relative "
        "error and where) or `error` (any other exception); `n/a` where the family does not support gradient "
        "checkpointing or cannot re-encode at all.",
        "",
        f"{len(rows)} families, {len(built)} built; {len(cases)} cases: "
        + ", ".join(f"{n} {v}" for v, n in counts.items()),
        "",
        f"WRONG in at least one case ({len(wrong_families)}): {', '.join(wrong_families) or 'none'}.",
        "",
        f"error in at least one case ({len(error_families)}): {', '.join(error_families) or 'none'}.",
        "",
        *margin(built),
        "",
        "| family | model | structure | measured error | " + " | ".join(modes) + " | "
        + " | ".join(f"{m} + ckpt" for m in modes) + " |",
        "|---" * (4 + 2 * len(modes)) + "|",
    ]
    for family, row in built.items():
        cells = [_cell(row[m, c]) for c in (False, True) for m in modes]
        errors = _error_cell(row.get("errors", {}))
        lines.append(f"| {family} | {row['class']} | {row['structure']} | {errors} | " + " | ".join(cells) + " |")
    not_built = {f: r["not built"] for f, r in rows.items() if "not built" in r}
    lines += ["", f"## Not built ({len(not_built)})", "", "| family | why |", "|---|---|"]
    lines += [f"| {f} | {_short(why, 160)} |" for f, why in not_built.items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help="model_type names (default: every causal-LM family)")
    parser.add_argument("--out", type=Path, default=None, help="the table (default: benchmarks/results/<date>-architectures.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    families = args.families or tiny_models.causal_lm_families()
    unknown = sorted(set(families) - set(tiny_models.causal_lm_families()))
    if unknown:
        parser.error(f"not causal-LM families of this transformers: {', '.join(unknown)}")
    start = time.perf_counter()
    rows = {}
    for family in families:
        t0 = time.perf_counter()
        rows[family] = sweep_family(family)
        verdicts = [v[0] for k, v in rows[family].items() if isinstance(k, tuple)]
        summary = rows[family].get("not built") or " ".join(verdicts)
        print(f"{family:28s} {time.perf_counter() - t0:6.1f} s  {_short(summary, 100)}", flush=True)
    out = args.out or RESULTS / f"{datetime.date.today():%Y-%m-%d}-architectures.md"
    write_table(rows, time.perf_counter() - start, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
