"""What the GPU check runs on: the libraries it needs, their versions against pyproject's bounds, the device, and
which copy of rrhf_fast is imported. Printed a line each, and written as a dated table.

    python benchmarks/gpu_versions.py                           # results/<date>-gpu-versions-<device>.md
    python benchmarks/gpu_versions.py --dry-run --out /tmp/x    # the same, the table elsewhere

The optional libraries (flash-attn, liger-kernel, cut-cross-entropy) only add rows to the benchmarks where they are
installed; an absent one is said, not an error. A required one that is absent or out of pyproject's bounds, or an
rrhf_fast imported from another checkout than this one, is: the exit status is then 1.
"""

import argparse
import importlib.metadata
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement

import report

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("torch", "triton", "transformers", "peft")
OPTIONAL = ("flash-attn", "liger-kernel", "cut-cross-entropy")


def bounds() -> dict[str, Requirement]:
    """pyproject's requirement of each package it names (its dependencies and optional extras), by name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {(req := Requirement(text)).name: req for text in texts}


def package_rows() -> list[dict]:
    wanted = bounds()
    rows = []
    for name in REQUIRED + OPTIONAL:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        req = wanted.get(name)
        ok = version is not None and (req is None or req.specifier.contains(version, prereleases=True))
        if version is None:
            verdict = "absent: " + ("required" if name in REQUIRED else "its rows are skipped")
        else:
            verdict = "ok" if ok else f"outside pyproject's {req.specifier}"
        rows.append({"what": name, "found": version or "absent", "pyproject": str(req.specifier) if req else "",
                     "verdict": verdict, "required": name in REQUIRED})  # fmt: skip
    return rows


def device_row() -> dict:
    if not torch.cuda.is_available():
        return {"what": "device", "found": "no CUDA device: the CPU", "pyproject": "", "verdict": "ok", "required": False}
    major, minor = torch.cuda.get_device_capability()
    found = f"{torch.cuda.get_device_name()}, capability {major}.{minor}, CUDA {torch.version.cuda}"
    return {"what": "device", "found": found, "pyproject": "", "verdict": "ok", "required": False}


def checkout_row() -> dict:
    """rrhf_fast and rrhf_fast.kernels must be this checkout's rrhf_fast/ and kernels/ folders."""
    import rrhf_fast
    import rrhf_fast.kernels

    found = [Path(m.__file__).resolve().parent for m in (rrhf_fast, rrhf_fast.kernels)]
    ok = found == [ROOT / "rrhf_fast", ROOT / "kernels"]
    verdict = "ok" if ok else f"not this checkout ({ROOT}): install it (pip install -e .) or link rrhf_fast/kernels"
    return {"what": "rrhf_fast", "found": ", ".join(map(str, found)), "pyproject": "", "verdict": verdict,
            "required": True}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for the dated table (default benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true", help="the table to --out or a new temporary folder")
    args = parser.parse_args(argv)
    rows = [*package_rows(), device_row(), checkout_row()]
    for row in rows:
        print(f"{row['what']}: {row['found']} ({row['verdict']})")
    bad = [r["what"] for r in rows if r["required"] and r["verdict"] != "ok"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = report.machine(device)
    where = report.file_device(device)
    notes = "What the GPU check found before it ran (benchmarks/gpu_check.sh). " + (
        f"Not as required: {', '.join(bad)}." if bad else "Everything required is there.")
    table = [{k: v for k, v in r.items() if k != "required"} for r in rows]
    out = report.out_dir(args.out, args.dry_run, "gpu_versions")
    path = report.write_table(table, f"gpu-versions-{where}", "GPU check: versions and device", info, notes, out)
    print(f"wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
