"""What the three commands (train, evaluate, sample) load, checked once: device, model, tokenizer, reward, data.

Every function raises ValueError (or rrhf_fast.data.DataError, a ValueError) naming the flag or path and
what to do; the commands turn those into one line on stderr and exit status 2, before any work is done.

    device(spec)                          "auto", "cpu", "cuda", "cuda:N" -> torch.device, or why not
    compute_dtype(spec, device)           "auto" (bf16 on CUDA, fp32 elsewhere), "float32", "bfloat16"
    model_config(path)                    the config of a model directory (no weights read)
    load_model_and_tokenizer(path)        AutoModelForCausalLM + AutoTokenizer, with the checks they need
    embedded_model(seed, ...)             the embedded tiny Llama and its byte tokenizer
    check_max_length(config, n, path)     --model-max-length within the model's positions
    check_encodes(examples, tok, path)    a tokenizer that tells the responses apart
    reward_function(spec)                 "task" or "module:function" -> f(prompt, response) -> float (or on lists)
    reward_model(path, ...)               a sequence-classification model -> batched f(prompts, responses) -> floats
    read_data(path, split="train")        the examples of a data file or dataset split, any format
    check_writable(directory)             an output directory this process can write into
    check_output_file(path, flag)         an output file: not a directory, in a writable one
"""

import importlib
import os
import sys
import tempfile

import torch

# ----------------------------------------------------------------------------------------------------------
# Device and dtype


def device(spec: str) -> torch.device:
    """The --device flag as a torch.device this process can use; "auto": cuda when available, else cpu."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec}: not a torch device; pass cpu, cuda, cuda:N or auto") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: this torch ({torch.__version__}) sees no CUDA device; pass --device cpu or auto")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible; pass cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    try:
        torch.empty(0, device=chosen)
    except Exception as err:  # mps, xpu, ... that this build or machine lacks
        raise ValueError(f"--device {spec}: cannot use it here ({' '.join(str(err).split())}); pass cpu or auto") from None
    return chosen


def compute_dtype(spec: str, on: torch.device) -> torch.dtype:
    """"auto": bfloat16 on CUDA, float32 elsewhere; or the named dtype."""
    if spec == "auto":
        return torch.bfloat16 if on.type == "cuda" else torch.float32
    return getattr(torch, spec)


# ----------------------------------------------------------------------------------------------------------
# Model and tokenizer


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def model_config(path: str, *, trust_remote_code: bool = False):
    """The transformers config of a local model directory, read before any weight is."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # anything transformers raises on a user's directory is bad input, not a crash
        raise ValueError(f"{path}: cannot load the model or tokenizer: {_one_line(err)}") from None


def load_model_and_tokenizer(path: str, *, dtype=torch.float32, trust_remote_code: bool = False, on_meta: bool = False):
    """(model, tokenizer) from a local Hugging Face causal-LM directory; pad_token set to EOS when missing.
    on_meta: the model built from its config on the meta device, no weights read (FSDP2's ranks other than 0,
    which receive their shards from rank 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = model_config(path, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if on_meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ValueError(f"{path}: cannot load the model or tokenizer: {_one_line(err)}") from None
    check_tokenizer(model, tokenizer, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def embedded_model(*, seed: int, hidden_size: int, num_layers: int, max_positions: int):
    """(model, tokenizer): the embedded tiny Llama initialised from seed, and its byte-level tokenizer."""
    from rrhf_fast.default_model import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=num_layers, max_positions=max_positions)
    return model, tokenizer


def check_tokenizer(model, tokenizer, path: str) -> None:
    """A tokenizer that ends candidates with EOS and whose ids all have a row in the model's input embeddings."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no eos_token (a candidate ends at EOS); set one in its tokenizer_config.json")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's input embeddings have {rows} rows; "
            f"use the model's own tokenizer, or model.resize_token_embeddings({len(tokenizer)}) and save it"
        )


def max_positions(config) -> int | None:
    """The positions a model's config declares (its text config's, for a multimodal one), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(config, model_max_length: int, path: str) -> None:
    positions = max_positions(config)
    if positions is not None and model_max_length > positions:
        raise ValueError(
            f"--model-max-length {model_max_length} is past the {positions} positions of {path}; "
            f"pass --model-max-length {positions} or less"
        )


def check_encodes(examples, tokenized, tokenizer, path: str) -> None:
    """A tokenizer that cannot tell the data's responses apart (each to nothing, or to unknown tokens only) is the
    wrong one, often a placeholder transformers built for a model directory without tokenizer files.

    `tokenized` is rrhf_fast.tokens.TokenizedData; the check runs on its flat buffers, so that it costs a few passes
    over the ids, not a Python object per token."""
    import numpy as np

    texts = {r for ex in examples for r in ex.responses}
    lengths, flat = tokenized.candidate_lengths(), tokenized.candidate_ids()
    one = len(lengths) > 0 and bool((lengths == lengths[0]).all())
    one = one and (lengths[0] == 0 or bool((flat.reshape(len(lengths), -1) == flat[: lengths[0]]).all()))
    ids = set(np.unique(flat).tolist()) - {tokenizer.eos_token_id}
    unknown = tokenizer.unk_token_id
    if (len(texts) > 1 and one) or (ids and unknown is not None and ids <= {unknown}):
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        encoded = {flat[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:])}
        raise ValueError(
            f"{path}: its tokenizer encodes the {len(texts)} different responses to {len(encoded)} token sequence(s) "
            f"of ids {sorted(ids)[:5]}: it cannot encode this data; are the tokenizer files (tokenizer.json, "
            f"tokenizer_config.json) missing from the model directory?"
        )


# ----------------------------------------------------------------------------------------------------------
# Rewards


def reward_function(spec: str):
    """'task' (the addition task's) or 'module:function' -> the reward function, imported and checked to be callable.

    It is called as f(prompt, response) -> float, or on lists (rrhf_fast.generation.is_batched_reward); pass it to
    generation.score_responses, which checks every value (a finite number) and names the query of a bad one."""
    if spec == "task":
        from rrhf_fast.task import reward as function

        return function
    return _import_function(spec)


def _import_function(spec: str):
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--reward {spec!r}: expected 'task' or 'module:function'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module in the working directory, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # whatever the user's module raises while importing is bad input, not a crash
        raise ValueError(f"--reward {spec!r}: importing {module_name} failed: {type(err).__name__}: {err}") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise ValueError(f"--reward {spec!r}: {module_name} has no attribute {function_name!r}")
    if not callable(function):
        raise ValueError(f"--reward {spec!r}: {function_name} is not callable")
    return function


def reward_model(path: str, *, on: torch.device, batch_size: int, trust_remote_code: bool = False):
    """Batched f(prompts, responses) -> logit 0 of a sequence-classification model on each reward_text, batch_size
    texts a forward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--reward-model {path}: not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=compute_dtype("auto", on), trust_remote_code=trust_remote_code
        )
    except Exception as err:  # anything from_pretrained raises on a user's directory is bad input
        raise ValueError(f"--reward-model {path}: cannot load: {_one_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # needed to find each row's last token in a padded batch
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(on).eval()

    @torch.no_grad()
    def score(prompts: list, responses: list[str]) -> list[float]:
        texts = [reward_text(tokenizer, p, r) for p, r in zip(prompts, responses)]
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True).to(on)
            out += model(**enc).logits[:, 0].float().tolist()
        return out

    score.batched = True  # generation.score_responses hands it a whole wave of prompts and responses
    return score


def reward_text(tokenizer, prompt, response: str) -> str:
    """What a reward model reads: prompt + response for a text prompt; for chat messages, the conversation with the
    response as the assistant's turn, rendered by the reward model's chat template (its turns' contents, one a
    line, when it has none)."""
    if isinstance(prompt, str):
        return prompt + response
    conversation = list(prompt) + [{"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    return "\n".join(m["content"] for m in conversation)


# ----------------------------------------------------------------------------------------------------------
# Files


def read_data(path: str, split: str = "train"):
    """The checked examples of `split` of a data file, a save_to_disk directory or a cached dataset, in any format
    rrhf_fast.data reads (a missing file or an unknown format is a DataError that says so)."""
    from rrhf_fast.data import read_examples

    return read_examples(path, split)


def check_writable(directory: str, flag: str = "--output-dir") -> None:
    """Create directory if needed and check that a file can be written into it."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {directory}: cannot write there ({err.strerror}); pass a writable directory") from None


def check_output_file(path: str | None, flag: str) -> None:
    """An output file that can be written: not a directory, in a directory that exists or can be made."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory; pass a file name")
    check_writable(os.path.dirname(os.path.abspath(path)), flag)
