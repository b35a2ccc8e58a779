"""pytest-benchmark: the sampling contenders of benchmarks/bench_sample.py on the embedded tiny model (CPU).

pyproject's addopts hold --benchmark-disable, so a plain `python -m pytest` (CI) runs each once, untimed, to keep
the script from rotting; the script itself (main) runs once on a tiny workload and writes its table to a
temporary directory. To time:

    python -m pytest benchmarks/test_bench_sample.py --benchmark-enable
"""

import pytest

import bench_sample
from test_bench_loss import one_cpu_thread  # noqa: F401  (autouse fixture: time on one CPU thread)

ARGV = ["--queries", "3", "--batch-sizes", "2", "-k", "2", "--prompt-lens", "1-9,1022-1023", "--max-new-tokens", "3", "--repeats", "1"]


@pytest.fixture(scope="module")
def setup():
    args = bench_sample.parse_args(ARGV)
    model, tokenizer, _ = bench_sample.load("tiny", args)
    prompts = bench_sample.make_prompts(tokenizer, args.queries, *args.prompt_lens[0], args.seed)
    return args, prompts, bench_sample.contenders(model, tokenizer, prompts, args.batch_sizes[0], args), tokenizer


def test_workload(setup):
    args, prompts, _, _ = setup
    assert sorted(len(p) for p in prompts) == [1, 5, 9]  # lengths spread evenly over --prompt-lens


@pytest.mark.parametrize("which", ["ours", "generate", "loop", "command"])
def test_contender(benchmark, setup, which):
    args, prompts, fns, tokenizer = setup
    out = benchmark(fns[which])
    if which == "command":  # the text the command writes: the loop's tokens decoded
        assert out == bench_sample.decoded(tokenizer, fns["loop"]())
        return
    assert len(out) == len(prompts) and all(len(cands) == args.k for cands in out)
    assert all(len(c) <= args.max_new_tokens for cands in out for c in cands) and any(c for cands in out for c in cands)
    if which == "ours":
        assert out == fns["loop"]()  # batching changes no draw


def test_script_writes_its_table(tmp_path):
    path = bench_sample.main([*ARGV, "--out", str(tmp_path)])
    text = path.read_text()
    assert path.name.endswith("-sample-cpu.md") and path.with_suffix(".csv").exists()
    # 1022-1023 prompt tokens + 3 new ones do not fit the tiny model's 1024 positions: that range is skipped
    assert text.count("| embedded tiny Llama") == 4 and "| 1-9 |" in text and "1022-1023" not in text.split("| model")[1]
