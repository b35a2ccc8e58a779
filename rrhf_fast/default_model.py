"""The embedded default model: a tiny Llama initialised from a seed, and a byte-level tokenizer.

Nothing is downloaded. The tokenizer maps every byte to one token (GPT-2's byte-to-unicode table, no
merges), so any text encodes, plus two special tokens, `<pad>` and `</s>` (end of sequence). Both are
written in Hugging Face format, so `AutoTokenizer.from_pretrained(dir)` and
`AutoModelForCausalLM.from_pretrained(dir)` load them like any other model.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"


def _bytes_to_unicode() -> dict[int, str]:
    """Byte value -> a printable unicode character (the table GPT-2's byte-level BPE uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0..255 are the bytes, 256 is `<pad>`, 257 is `</s>`."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[PAD_TOKEN] = 256
    vocab[EOS_TOKEN] = 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD_TOKEN, EOS_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, model_max_length=1024
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    hidden_size: int = 96,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 1024,
) -> LlamaForCausalLM:
    """A small Llama whose weights depend only on `seed` and the sizes (max_positions changes no weight: rotary
    positions have none; it is the --model-max-length the saved model accepts, as many as the tokenizer's)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.eos_token_id
    return model
