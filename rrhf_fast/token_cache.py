"""A cache of the tokenised training set, so that a second run on the same data skips the tokenizer.

Tokenising is most of what stands between a command and its first step on a published set (the tokenizer's own
time grows with the text; reading the JSON is a fraction of it). The tokenised set is a few flat arrays
(rrhf_fast.tokens.TokenizedData), written as one uncompressed .npz file under the cache directory (the trainer's
is <output-dir>/data/tokenized/), named by a key that changes with everything the tokens depend on:

    the data's bytes        the file, or every file of a save_to_disk directory, and the split
    the tokenizer           every file its save_pretrained writes (vocabulary, merges, special tokens, template)
    the chat template       --chat-template's text, when given
    max_length              --model-max-length
    the code                the bytes of rrhf_fast.data, rrhf_fast.tokens and this module, and the versions of
                            transformers and tokenizers

so a changed file, tokenizer, template or length is a new key (a miss), never stale tokens. A dataset name in the
local Hugging Face cache has no file of its own to hash: it is tokenised every time. A file that cannot be read
back (cut short, another numpy) counts as a miss and is written again; the write goes to a temporary name first and
is renamed, so a crash or a second process never leaves half a file under a key.
"""

import hashlib
import os
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

from rrhf_fast import tokens

_CHUNK = 8 << 20  # bytes hashed at a time
_ARRAYS = ("ids", "offsets", "groups", "rewards")


def _hash_file(h, path: str) -> None:
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)


def _hash_data(h, path: str) -> bool:
    """Feed the bytes of a data file or of every file under a directory to h; False when path is neither."""
    if os.path.isfile(path):
        _hash_file(h, path)
        return True
    if not os.path.isdir(path):
        return False
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            _hash_file(h, full)
    return True


def tokenizer_digest(tokenizer) -> str:
    """A digest of every file tokenizer.save_pretrained writes: two tokenizers that encode alike save alike."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="rrhf_fast-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            h.update(name.encode() + b"\0")
            _hash_file(h, os.path.join(tmp, name))
    return h.hexdigest()


def key(path: str, split: str, tokenizer_id: str, chat_template: str | None, max_length: int) -> str | None:
    """The cache key of `split` of `path` tokenised by the tokenizer of digest tokenizer_id; None when path is not
    a file or directory (nothing to hash)."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    if not _hash_data(h, path):
        return None
    for module in ("data.py", "tokens.py", "token_cache.py"):
        _hash_file(h, os.path.join(os.path.dirname(__file__), module))
    parts = (split, tokenizer_id, chat_template or "", str(max_length), transformers.__version__, tokenizers.__version__)
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:32]


def load(directory: str, name: str):
    """(TokenizedData, (prompts cut, responses cut)) stored under name, or None when there is none readable."""
    path = os.path.join(directory, name + ".npz")
    try:
        with np.load(path) as stored:
            data = tokens.TokenizedData(*(stored[a] for a in _ARRAYS))
            cut = tuple(int(v) for v in stored["cut"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return data, cut


def save(directory: str, name: str, data, cut: tuple[int, int]) -> None:
    """Store data and its truncation counts under name, atomically (a temporary file renamed)."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{a: getattr(data, a) for a in _ARRAYS}, cut=np.array(cut, dtype=np.int64))
        os.replace(tmp, os.path.join(directory, name + ".npz"))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclass
class Tokenized:
    """What `tokenize` gives: the data, its truncation counts, and whether they came from the cache."""

    data: tokens.TokenizedData
    cut: object  # rrhf_fast.data.Truncation
    hit: bool
    directory: str | None = None
    name: str | None = None  # the key; None: nothing to cache

    def store(self) -> None:
        """Write the data under its key (a caller that checks the tokens first stores them after the check)."""
        if self.name is not None and not self.hit:
            save(self.directory, self.name, self.data, (self.cut.prompts, self.cut.responses))


def tokenize(examples, tokenizer, max_length: int, chat_template: str | None, *, path: str, split: str = "train",
             directory: str | None) -> Tokenized:  # fmt: skip
    """rrhf_fast.data.tokenize(examples, ...), from the cache in `directory` when it holds this data's tokens.

    `examples` are the checked records of `split` of `path`; directory None: no cache. A miss is tokenised and not
    yet written: call .store() on the result."""
    from rrhf_fast import data

    name = key(path, split, tokenizer_digest(tokenizer), chat_template, max_length) if directory is not None else None
    found = load(directory, name) if name is not None else None
    if found is not None and len(found[0]) == len(examples):
        stored, (prompts, responses) = found
        return Tokenized(stored, data.Truncation(prompts, responses), True, directory, name)
    tokenized, cut = data.tokenize(examples, tokenizer, max_length, chat_template)
    return Tokenized(tokenized, cut, False, directory, name)
