"""pytest-benchmark: one RRHF optimizer step on a tiny Llama (CPU), the original RRHF code's way against rrhf_fast's.

The step (zero_grad, forward, loss, backward, AdamW.step) and its variants are benchmarks/bench_step.py's:
`original` re-encodes the prompt for every candidate, takes the full logits and the naive loss; `ours` is
rrhf_fast.model_loss with prefix sharing (mode "auto") and the fused head. Before timing, both are checked to give
the same loss and the same gradient for every parameter.

pyproject's addopts hold --benchmark-disable, so a plain `python -m pytest` (CI) runs each benchmark once, untimed,
to keep it from rotting. To time it:

    python -m pytest benchmarks/test_bench_step.py --benchmark-enable
"""

import os

import pytest
import torch

import bench_step
from rrhf_fast.prefix import resolve_mode
from test_bench_loss import one_cpu_thread  # noqa: F401  (autouse fixture: time on one CPU thread)

ARGV = ["--preset", "tiny", "--prompt-lens", "24", "--response-lens", "6", "--ks", "3", "--groups", "2"]


@pytest.fixture(scope="module")
def setup():
    args = bench_step.parse_args(ARGV)
    model = bench_step.build_model(args, "cpu", torch.float32)
    work = bench_step.build_workload(bench_step.sweep_points(args)[0], args.vocab, "cpu", args.seed)
    ours = "ours-" + resolve_mode(model, "auto")
    return model, work, {"original": "original", "ours": ours}


def gradients(model, work, variant):
    model.zero_grad(set_to_none=True)
    loss = bench_step.VARIANTS[variant][2](model, work).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_ours_matches_original(setup):
    model, work, variants = setup
    loss, grads = gradients(model, work, variants["ours"])
    ref_loss, ref_grads = gradients(model, work, variants["original"])
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("which", ["original", "ours"])
def test_step(benchmark, setup, which):
    model, work, variants = setup
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = bench_step.make_step(model, optimizer, work, variants[which])
    before = model.lm_head.weight.detach().clone()
    loss = benchmark(step)
    assert torch.isfinite(loss)
    assert not torch.equal(model.lm_head.weight, before), "the optimizer step changed no weight"


def test_model_directory(tiny_llama):
    """--model DIR: the shape comes from the directory's config, the weights are the pretrained ones (not a
    fresh init), and ours matches original on them."""
    from transformers import AutoModelForCausalLM

    args = bench_step.parse_args(["--model", tiny_llama, "--prompt-lens", "9", "--response-lens", "1,4", "--ks", "2"])
    saved = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert (args.vocab, args.hidden, args.layers) == (saved.config.vocab_size, 32, 1)
    assert args.label == os.path.basename(tiny_llama) and "pretrained weights" in bench_step.describe(args)
    model = bench_step.build_model(args, "cpu", torch.float32)
    assert model.training
    torch.testing.assert_close(model.lm_head.weight, saved.lm_head.weight, atol=0, rtol=0)
    for i, point in enumerate(bench_step.sweep_points(args)):
        work = bench_step.build_workload(point, args.vocab, "cpu", args.seed + i)
        # check_losses raises when a variant's loss is more than 1e-4 (relative) from original's.
        losses = bench_step.check_losses(model, work, list(bench_step.VARIANTS), torch.float32)
        assert losses["original"] > 0


def test_model_directory_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_step.parse_args(["--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--model {tmp_path}: no config.json" in capsys.readouterr().err


def test_a_variant_that_cannot_run_gets_a_row_saying_why(tmp_path):
    """Under gradient checkpointing the probe refuses "kv-cache": the sweep records why, in its row at every point
    (--groups is a sweep dimension), and times the others; --dry-run writes its table to --out."""
    args = bench_step.parse_args(["--dry-run", "--gradient-checkpointing", "--groups", "1,3", "--ks", "2",
                                  "--variants", "original,reencode-fused,ours-kv-cache", "--no-memory", "--out", str(tmp_path)])
    rows, _ = bench_step.run_sweep(args)
    assert [(r["groups"], r["variant"]) for r in rows] == [
        (g, v) for g in (1, 3) for v in ("original", "reencode-fused", "ours-kv-cache")]
    for row in rows:
        refused = row["variant"] == "ours-kv-cache"
        assert (row["ms/step"] == "") == refused and ("gradient checkpointing" in row["note"]) == refused
        assert refused or row["ms/step"] > 0
