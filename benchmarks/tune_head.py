"""Tune the fused loss head on a GPU: the chunk size and the dW accumulation of the one-sweep path, against the floor.

One size (default N=8192, D=4096, V=128256, bf16), one process; a dated table under benchmarks/results/:

    floor                the three head matmuls timed on their own (6NVD at this GPU's rate)
    reference            rrhf_fast.reference (full logits), for the time and memory ratios
    torch / triton @ 2^c the one-sweep path (head.linear_rrhf_fwd) with CUDA_CHUNK_ELEMENTS = 2^c
    ... no-out-dtype     the same with dW accumulated through a bf16 product and an fp32 copy (torch < 2.8)
    triton-two-pass      the two-pass head (sequence_scores, extra upstream gradients): cuBLAS + Triton elementwise

The registers, spills and shared memory of the kernels compiled in the run come from their cubins in Triton's
cache: `for f in ~/.triton/cache/*/*.cubin; do cuobjdump -res-usage $f; done`.

    python benchmarks/tune_head.py                                  # on a CUDA machine
    python benchmarks/tune_head.py --size 4096,4096,32000 --chunks 25,26,27
"""

import argparse
from pathlib import Path

import torch

import bench_loss
import report
from rrhf_fast import head


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="8192,4096,128256", help="N,D,V")
    parser.add_argument("--chunks", default="27,28,29", help="log2 of CUDA_CHUNK_ELEMENTS to try")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="100 ms units of do_bench time")
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="folder for the dated table")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split(","))
    dtype = getattr(torch, args.dtype)
    n, d, v = size

    floor = bench_loss.matmul_floor(*size, dtype, "cuda", args.repeats)
    rows = [{"variant": "floor (6NVD matmuls)", "ms": floor * 1e3, "x floor": 1.0, "extra MiB": float("nan")}]

    def run(label, provider, check=True):
        r = bench_loss.measure(provider, *size, dtype, "cuda", args.repeats, check)
        torch.cuda.empty_cache()
        row = {"variant": label, "ms": r["seconds"] * 1e3, "x floor": r["seconds"] / floor, "extra MiB": r["extra_bytes"] / 2**20}
        rows.append(row)
        print(row, flush=True)

    run("reference", "reference", check=False)
    default = head.CUDA_CHUNK_ELEMENTS
    for c in (int(x) for x in args.chunks.split(",")):
        head.CUDA_CHUNK_ELEMENTS = 1 << c
        for provider in ("torch", "triton"):
            run(f"{provider} @ 2^{c}", provider, check=c == 28)
    head.CUDA_CHUNK_ELEMENTS = default
    if head._ADDMM_OUT_DTYPE:
        head._ADDMM_OUT_DTYPE = False
        run("triton @ default, no-out-dtype", "triton", check=True)
        head._ADDMM_OUT_DTYPE = True
    run("triton-two-pass", "triton-two-pass")
    for row in rows:
        row["x reference"] = row["ms"] / rows[1]["ms"]

    info = report.machine("cuda")
    notes = (
        f"N={n} D={d} V={v} {args.dtype}, fwd+bwd of rrhf_loss's head; floor: the three head matmuls timed alone, "
        f"{6 * n * d * v / floor / 1e12:.0f} TFLOP/s. Reproduce: `python benchmarks/tune_head.py --size {args.size} "
        f"--chunks {args.chunks}`."
    )
    name = "tune-head-" + info["device"].replace(" ", "-").lower()
    path = report.write_table(rows, name, "Loss head: chunk size and dW accumulation", info, notes, args.out)
    print(path.read_text())


if __name__ == "__main__":
    main()
