"""The online benchmark's dry run (benchmarks/bench_online.py --dry-run): both trainers on the embedded tiny model for
a few seconds each, so that the script keeps running; the figures measure nothing."""

import csv

import bench_online


def test_dry_run_writes_the_table_and_the_plot(tmp_path):
    path = bench_online.main(["--dry-run", "--sides", "grpo,rrhf-bar", "--out", str(tmp_path / "out"),
                              "--work", str(tmp_path / "work")])  # fmt: skip
    assert path.name.endswith("-online-cpu.md") and path.with_suffix(".png").stat().st_size > 0
    rows = list(csv.DictReader(open(path.with_suffix(".csv"))))
    assert [r["side"] for r in rows] == ["grpo", "rrhf-bar"]
    for row in rows:
        assert int(row["steps"]) >= 1 and int(row["prompts"]) == 2 * int(row["steps"])
        assert float(row["train s"]) >= 2.5  # about the budget of a dry run (3 s), less the bookkeeping between steps
        # sampling, scoring and updating add up to the training time
        parts = float(row["sampling s"]) + float(row["scoring s"]) + float(row["update s"])
        assert abs(parts - float(row["train s"])) < 1e-6 * float(row["train s"]) + 1e-9
    assert rows[0]["reward before"] == rows[1]["reward before"]  # the same model, measured by the same code
