"""benchmarks/bench_data.py at a tiny size: the dry run writes its table, and a path measured in a fresh process
gives the figures the table is made of (so that the script does not rot between full runs)."""

import bench_data


def test_dry_run_writes_its_table(tmp_path):
    path = bench_data.main(["--dry-run", "--out", str(tmp_path)])
    text = path.read_text()
    assert path.name.endswith("-data-cpu.md") and path.with_suffix(".csv").exists()
    assert "A dry run" in text and "| 30 | 4 |" in text and "| 300 | 4 |" in text


def test_a_path_in_a_fresh_process(tmp_path):
    """The cache path in its own process: the second run loads the first run's tokens (checked inside) and is
    measured apart from the first."""
    file = tmp_path / "d.jsonl"
    chars = bench_data.write_data(file, 12, 3, seed=1)
    assert chars > 12 * (40 + 3 * 80) and len(file.read_text().splitlines()) == 12
    args = bench_data.parse_args(["--tokenizer", "tiny"])
    got = bench_data.run_child("cache", file, args)
    assert set(got) == {"first_s", "second_s"} and got["first_s"] > 0 and got["second_s"] > 0
