"""Reading and tokenising preference data at the size of the published sets, against the tokenizer's own floor.

Synthetic RRHF JSONL files of --sizes queries, k responses each, text of the lengths such sets hold (prompts of
40-560 characters, responses of 80-1120, English words with dates and numbers among them), are measured each in a
fresh process (so that one size's freed pages do not hide the next one's peak) through four paths:

    ours      rrhf_fast.data.read_examples + rrhf_fast.data.tokenize: JSON read and checked, then tokenised in
              rounds into the compact store (rrhf_fast.tokens.TokenizedData); wall time and peak resident-set
              growth (VmHWM over the resident set before the call)
    floor     the tokenizer's own batch call (tokenizer(texts).input_ids) on the same texts, in the same rounds,
              its output dropped: the time no reader can beat; the memory floor is the raw bytes of the token ids
              (2 a token for a vocabulary of at most 65536, else 4)
    cache     rrhf_fast.token_cache.tokenize twice with a fresh cache directory: the first run reads, tokenises and
              stores; the second reads and loads the stored tokens (a second training run on the same data)

`x floor` is ours' seconds over the floor's; `MB / 1k queries` ours' peak growth per thousand queries.

    python benchmarks/bench_data.py                                      # 2k, 20k, 200k queries, SmolLM2's tokenizer
    python benchmarks/bench_data.py --sizes 2000,20000 --tokenizer tiny
    python benchmarks/bench_data.py --dry-run --out /tmp/x               # tiny sizes, byte tokenizer, one process

The tokenizer is SmolLM2's (a prepared directory at ~/.cache/rrhf_fast/smollm2-135m-instruct, see
examples/prepare_smollm2.py), or the embedded byte tokenizer when that is absent or --tokenizer tiny.
Results: benchmarks/results/<date>-data-cpu.md and .csv, with the machine and the load.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report
from report import machine, write_table

SMOLLM2 = os.path.join(os.path.expanduser("~"), ".cache", "rrhf_fast", "smollm2-135m-instruct")
WORDS = (
    "the of and a to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "2024-05-01 1999-12-31 3.14 42 007 1e5 -7 0.5 true null NaN 12:30 $20 50%"
).split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,20000,200000", help="queries of each file, comma-separated")
    p.add_argument("-k", type=int, default=4, help="responses a query")
    p.add_argument("--tokenizer", default=None, help=f"a Hugging Face tokenizer directory, or tiny (default: {SMOLLM2} when prepared, else tiny)")
    p.add_argument("--max-length", type=int, default=4096, help="tokens a candidate (prompt + response)")
    p.add_argument("--cache-sizes", default="2000,20000", help="the sizes also measured through the cache (two more runs each; default: the two smaller)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the tables (default: benchmarks/results; a dry run: a temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (30 and 300 queries) with the byte tokenizer, every path in this process: checks the script, measures nothing")
    p.add_argument("--child", nargs=3, metavar=("PATH", "FILE", "TOKENIZER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.sizes, args.cache_sizes, args.tokenizer = "30,300", "30,300", "tiny"
        args.out = str(report.out_dir(args.out, True, "bench_data"))
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.cache_sizes = [int(s) for s in args.cache_sizes.split(",") if s]
    if args.tokenizer is None:
        args.tokenizer = SMOLLM2 if os.path.isfile(os.path.join(SMOLLM2, "tokenizer.json")) else "tiny"
    return args


def write_data(path: Path, queries: int, k: int, seed: int) -> int:
    """An RRHF JSONL file of `queries` lines; returns the characters of text it holds."""
    rng, chars = random.Random(seed), 0

    def text(low, high):
        words, size = [], 0
        target = rng.randint(low, high)
        while size < target:
            words.append(rng.choice(WORDS))
            size += len(words[-1]) + 1
        return " ".join(words)

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(queries):
            prompt, responses = text(40, 560), [text(80, 1120) for _ in range(k)]
            scores = [rng.choice([rng.randint(0, 10), round(rng.uniform(-5, 5), 3)]) for _ in range(k)]
            chars += len(prompt) + sum(map(len, responses))
            f.write(json.dumps({"query": prompt, "responses": responses, "scores": scores}) + "\n")
    return chars


def load_tokenizer(spec: str):
    if spec == "tiny":
        from rrhf_fast.default_model import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def child(which: str, file: str, spec: str, max_length: int) -> dict:
    """One path's figures on one file (run in a fresh process)."""
    from rrhf_fast import data, token_cache

    tokenizer = load_tokenizer(spec)
    if which == "floor":
        examples = data.read_examples(file)
        tokens = 0

        def encode():
            nonlocal tokens
            for part in data.rounds(examples):
                prompts = tokenizer([ex.prompt for ex in part], return_attention_mask=False).input_ids
                responses = tokenizer([r for ex in part for r in ex.responses], add_special_tokens=False,
                                      return_attention_mask=False).input_ids  # fmt: skip
                tokens += sum(map(len, prompts)) + sum(map(len, responses)) + len(responses)  # + EOS a response

        start = time.perf_counter()
        encode()
        return {"seconds": time.perf_counter() - start, "tokens": tokens}
    if which == "ours":
        found = {}

        def read_and_tokenize():
            t0 = time.perf_counter()
            examples = data.read_examples(file)
            found["read_s"] = time.perf_counter() - t0
            found["data"], _ = data.tokenize(examples, tokenizer, max_length)

        start = time.perf_counter()
        grew = report.peak_extra_bytes(read_and_tokenize, "cpu")
        seconds = time.perf_counter() - start
        stored = found["data"]
        return {"seconds": seconds, "read_s": found["read_s"], "peak_mb": grew / 2**20, "tokens": len(stored.ids),
                "id_mb": stored.ids.nbytes / 2**20, "store_mb": stored.nbytes / 2**20}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_data-cache-") as cache:
        times, results = [], []
        for _ in range(2):
            start = time.perf_counter()
            examples = data.read_examples(file)
            got = token_cache.tokenize(examples, tokenizer, max_length, None, path=file, directory=cache)
            got.store()
            times.append(time.perf_counter() - start)
            results.append(got)
        first, second = (r.data for r in results)
        same = all((getattr(first, a) == getattr(second, a)).all() for a in ("ids", "offsets", "groups", "rewards"))
        if not (results[1].hit and same):
            raise RuntimeError("the second run did not load the same tokens from the cache")
        return {"first_s": times[0], "second_s": times[1]}


def run_child(which: str, file: Path, args) -> dict:
    """child() in a fresh process; in a dry run, in this one (the figures measure nothing, and it is quick)."""
    if args.dry_run:
        return child(which, str(file), args.tokenizer, args.max_length)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, __file__, "--child", which, str(file), args.tokenizer, "--max-length", str(args.max_length)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{which} on {file.name} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        for queries in args.sizes:
            file = Path(tmp) / f"rrhf-{queries}.jsonl"
            chars = write_data(file, queries, args.k, args.seed)
            ours, floor = run_child("ours", file, args), run_child("floor", file, args)
            cache = run_child("cache", file, args) if queries in args.cache_sizes else {"first_s": "", "second_s": ""}
            if ours["tokens"] != floor["tokens"]:
                raise RuntimeError(f"ours holds {ours['tokens']} tokens, the tokenizer gave {floor['tokens']}")
            rows.append({
                "queries": queries, "k": args.k, "file MB": file.stat().st_size / 2**20, "text M chars": chars / 1e6,
                "tokens (M)": ours["tokens"] / 1e6, "ours s": ours["seconds"], "of which read s": ours["read_s"],
                "floor s": floor["seconds"], "x floor": ours["seconds"] / floor["seconds"],
                "ours peak MB": ours["peak_mb"], "MB / 1k queries": ours["peak_mb"] / queries * 1000,
                "token ids MB": ours["id_mb"], "store MB": ours["store_mb"], "cache 1st run s": cache["first_s"],
                "cache 2nd run s": cache["second_s"],
                "x faster 2nd": cache["first_s"] / cache["second_s"] if cache["second_s"] else "",
            })  # fmt: skip
            print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()), flush=True)
            file.unlink()
    return rows


def main(argv=None) -> Path:
    args = parse_args(argv)
    load_start = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = run(args)
    info = machine("cpu")
    import tokenizers

    info["tokenizers"] = tokenizers.__version__
    name = "SmolLM2-135M-Instruct's (vocabulary 49152)" if args.tokenizer == SMOLLM2 else (
        "the embedded byte tokenizer (258 tokens)" if args.tokenizer == "tiny" else args.tokenizer)  # fmt: skip
    command = " ".join(["python benchmarks/bench_data.py", *(sys.argv[1:] if argv is None else argv)])
    notes = (
        f"Command: `{command}`. " + ("A dry run (tiny sizes): the figures measure nothing. " if args.dry_run else "")
        + f"Tokenizer: {name}; --max-length {args.max_length}; each path in a fresh process, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average (1, 5, 15 min) {load_start} at the start, "
        + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end. `ours s`: read_examples + tokenize "
        "(`of which read s`: the JSON read and checked); `floor s`: the tokenizer's batch call alone on the same "
        "texts in the same rounds; `x floor`: their ratio; `ours peak MB`: growth of the peak resident set over the "
        "call; `token ids MB`: the raw bytes of the ids, `store MB` with offsets and rewards; `cache 1st / 2nd run s`: "
        "read + tokenise + store, then read + load from rrhf_fast.token_cache, in one process."
    )  # fmt: skip
    kwargs = {} if args.out is None else {"out_dir": Path(args.out)}
    path = write_table(rows, "data-cpu", "Data: reading and tokenising preference sets, against the tokenizer's floor", info, notes, **kwargs)
    print(f"wrote {path} and {path.with_suffix('.csv')}")
    return path


if __name__ == "__main__":
    if "--child" in sys.argv:
        args = parse_args(sys.argv[1:])
        print(json.dumps(child(args.child[0], args.child[1], args.child[2], args.max_length)))
    else:
        main()
