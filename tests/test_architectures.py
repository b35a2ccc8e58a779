"""Every decoder-only causal-LM family transformers ships, tiny in float64, through model_loss in every mode of
prefix.MODES, with and without gradient checkpointing: the loss and every parameter gradient equal those of each
candidate re-encoded alone through the model's own logits (1e-6 relative), or the mode is refused with a
ValueError that names a mode. A different number, another exception or a traceback fails.

The default run takes one family of every structural kind (REPRESENTATIVE); the others are marked slow
(`python -m pytest tests/test_architectures.py -m slow`). benchmarks/architecture_sweep.py writes the same
verdicts as a table.
"""

import pytest

import tiny_models
from rrhf_fast.prefix import MODES
from test_prefix import one_thread  # noqa: F401  (autouse fixture: tiny models run fastest on one thread)

# One family for each kind of structure that decides whether prefix sharing is exact.
REPRESENTATIVE = {
    "llama": "plain attention, rotary positions",
    "gpt2": "learned absolute positions",
    "mistral": "sliding window on every layer",
    "gpt_neo": "local attention layers under another name (window_size)",
    "bloom": "ALiBi from the padding mask",
    "mpt": "ALiBi set in attn_config",
    "gemma2": "final logit softcap",
    "recurrent_gemma": "logits_soft_cap and recurrent (RG-LRU) layers",
    "cohere": "logit scale",
    "bert": "BERT-style transform before the output Linear",
    "mamba": "recurrent (selective state space), no attention",
    "qwen3_next": "linear attention (gated delta net) beside full attention, MoE",
    "lfm2": "short convolutions beside attention",
    "falcon_h1": "Mamba-2 and attention in parallel, muP multipliers",
    "mixtral": "mixture of experts",
    "deepseek_v32": "sparse attention over a learned top-k index, MLA",
}
FAMILIES = tiny_models.causal_lm_families()


_CACHE = {}


def model_and_reference(family: str, checkpointing: bool):
    """The family's tiny model (checkpointing on or off) and its re-encoded loss and gradients, built once."""
    key = (family, checkpointing)
    if key not in _CACHE:
        try:
            model, _ = tiny_models.build(family)
        except Exception as e:  # noqa: BLE001
            _CACHE[key] = ("not built", f"{type(e).__name__}: {e}")
            return _CACHE[key]
        if checkpointing:
            try:
                tiny_models.enable_checkpointing(model)
            except NotImplementedError as e:
                _CACHE[key] = ("no checkpointing", str(e))
                return _CACHE[key]
        groups = tiny_models.probe_groups()
        try:
            expected = tiny_models.reencoded_loss_and_grads(model, groups)
        except Exception as e:  # noqa: BLE001
            _CACHE[key] = ("no reference", f"{type(e).__name__}: {e}")
            return _CACHE[key]
        _CACHE[key] = ("ok", (model, groups, expected))
    return _CACHE[key]


def _cases():
    for family in FAMILIES:
        marks = () if family in REPRESENTATIVE else (pytest.mark.slow,)
        for checkpointing in (False, True):
            for mode in MODES:
                yield pytest.param(family, mode, checkpointing, marks=marks, id=f"{family}-{mode}{'-ckpt' if checkpointing else ''}")


@pytest.mark.parametrize("family, mode, checkpointing", list(_cases()))
def test_equal_to_reencoding_or_refused(family, mode, checkpointing):
    status, value = model_and_reference(family, checkpointing)
    if status != "ok":
        # The representative families must build and re-encode; another family that cannot is listed as skipped.
        if family in REPRESENTATIVE and status != "no checkpointing":
            pytest.fail(f"{family} {status}: {value}")
        pytest.skip(f"{status}: {value}")
    model, groups, expected = value
    verdict, detail = tiny_models.check_mode(model, mode, groups, expected)
    assert verdict in ("exact", "refused"), f"{family} mode={mode!r} checkpointing={checkpointing}: {verdict}: {detail}"


def test_representative_families_exist():
    """A family renamed or dropped by transformers would silently shrink the default run."""
    assert set(REPRESENTATIVE) <= set(FAMILIES)


def test_check_tells_a_wrong_head_from_an_exact_one():
    """The check itself: a Llama is exact in "none"; the same Llama with its logits scaled behind model_loss's
    back (a forward hook on the LM head, invisible to any config attribute) is WRONG, not exact."""
    model, _ = tiny_models.build("llama")
    groups = tiny_models.probe_groups()
    assert tiny_models.check_mode(model, "none", groups)[0] == "exact"
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: 3.0 * out)
    verdict, detail = tiny_models.check_mode(model, "none", groups)
    assert verdict == "WRONG", detail


def test_one_layer_of_each_kind():
    """Hybrid families keep every layer kind their full-size config lists, in as few layers as that takes."""
    config = tiny_models.tiny_config("qwen3_next")
    assert sorted(set(config.layer_types)) == ["full_attention", "linear_attention"]
    assert config.num_hidden_layers == len(config.layer_types) == 2
    assert tiny_models.tiny_config("lfm2").layer_types == ["conv", "full_attention"]


@pytest.mark.parametrize("family", sorted(REPRESENTATIVE))
def test_rounding_and_structure_are_far_from_the_bound(family):
    """Every path the check measures on the family (the fused head, packed, kv-cache and none, each run as it is,
    even where the check leaves it out by construction) is off by less than 1/100 of probe.TOLERANCE or by more than
    100 times it: no error sits near the bound, on either side."""
    from rrhf_fast import probe
    from rrhf_fast.batch import pack_batch

    status, value = model_and_reference(family, False)
    assert status == "ok", value
    model, groups, _ = value
    errors = {path: err for path, (err, _) in probe.path_errors(model, pack_batch(*groups)).items() if not path.startswith("twin")}
    near = {path: err for path, err in errors.items() if probe.TOLERANCE / 100 < err < 100 * probe.TOLERANCE}
    assert not near, errors
