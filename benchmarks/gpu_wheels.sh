#!/usr/bin/env bash
# Download, here, the wheels the GPU check needs and the GPU machine's image lacks, into the repository's .whl/
# (gitignored), for that machine's Python 3.12 on manylinux x86_64. The device tool's run carries the folder
# (carry [".whl"]) and benchmarks/gpu_check.sh installs it into /tmp/site with --no-deps before its stages.
#
#   bash benchmarks/gpu_wheels.sh            # then: git status shows nothing new (.whl/ is ignored)
#
# The image (the device tool's KINDS.md): Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0, peft,
# pytest, pytest-benchmark, matplotlib, safetensors, tokenizers, tqdm, numpy. It lacks, and gets from here:
#   liger-kernel 0.8.5        ~0.9 MB, pure Python; needs torch and triton (there)   stage 2's Liger row
#   cut-cross-entropy 25.1.1  ~23 kB, pure Python; needs torch and triton (there)    stage 2's CCE row
# Left out (a call carries 64 MiB, the working tree included):
#   flash-attn (stage 4's flash-attn row): PyPI holds its source alone, whose CUDA build takes hours; its prebuilt
#     wheels (GitHub releases, one per torch / CUDA / Python) are hundreds of MB. The row is skipped, and says so.
#   datasets (and dill, multiprocess): only save_to_disk directories of rrhf_fast.data need it, and no stage reads one.
set -eu

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python; } || PY=python3

mkdir -p "$ROOT/.whl"
for spec in "${WHEELS[@]}"; do
    stem=$(echo "${spec%%==*}" | tr - _)
    # one version of each: two wheels of one name stop the whole install there
    find "$ROOT/.whl" -maxdepth 1 -name "${stem}-*.whl" ! -name "${stem}-${spec#*==}-*.whl" -delete
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$ROOT/.whl" "${WHEELS[@]}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
for spec in "${WHEELS[@]}"; do
    stem=$(echo "${spec%%==*}" | tr - _)
    compgen -G "$ROOT/.whl/${stem}-${spec#*==}-*.whl" >/dev/null || { echo "gpu_wheels.sh: $spec did not download" >&2; exit 1; }
done
ls -l "$ROOT/.whl"
bytes=$(du -cb "$ROOT"/.whl/*.whl | tail -1 | cut -f1)
echo "$(( bytes / 1024 )) KiB in .whl/, of the 64 MiB a call carries with the working tree"
