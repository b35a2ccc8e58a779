#!/usr/bin/env bash
# The GPU check: one command that measures what only a GPU can, in stages, each under its own time limit (one hang
# cannot eat the rest), each writing its dated tables under benchmarks/results/ as it finishes (a run cut off still
# leaves what it measured), with a summary line per stage at the end. Under 9 minutes on one H100 / H200.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine
#   bash benchmarks/gpu_check.sh --stages 2,4             # a rerun of some stages
#   bash benchmarks/gpu_check.sh --dry-run [--out DIR]    # every stage on this CPU at tiny sizes (Triton interpreted);
#                                                         # tables in DIR (default: a new temporary folder)
#
# Stages (limits in seconds; the drivers are benchmarks/*.py, each with --help):
#   0 versions   20  torch, triton, transformers, peft, flash-attn, liger-kernel, cut-cross-entropy, the device, and
#                    which rrhf_fast is imported (gpu_versions.py)
#   1 tests     110  the cuda-marked tests and the kernel tests on CUDA: every Triton kernel compiled at the trainer's
#                    shapes, k = 2, 4, 8, 16, bf16 and fp32, V = 32000 / 128256 / 151936 (gpu_tests.py)
#   2 loss       80  the fused head at N = 8192, D = 4096, V = 128256 bf16 against the 6NVD floor and the reference's
#                    memory, Liger and CCE where they install; then inside a training step: fp32 master weight under
#                    bf16 autocast (bench_loss.py, bench_loss.py --autocast)
#   3 probe      45  rrhf_fast.probe.plan under bf16 autocast on the 1B Llama shape, and SmolLM2 where it is prepared:
#                    the plan and its cost in training steps (bench_probe_cost.py)
#   4 step      150  a training step of the 1B Llama shape at P = 512, R = 128, k = 4, 8 and 32 groups, and 32
#                    under gradient checkpointing (bench_step.py); the body alone, SDPA's dense mask against FlexAttention
#                    against the kv-cache, and flash-attn where it is installed (bench_prefix.py)
#   5 sample     35  batched sampling against generate(num_return_sequences=k) (bench_sample.py)
#   6 fsdp       75  torchrun --nproc_per_node 1 -m rrhf_fast.train --fsdp --bf16 against the same run without --fsdp
#                    (bench_fsdp.py; NCCL, or gloo in the dry run)
#
# Before the stages: the wheels in .whl/ (benchmarks/gpu_wheels.sh downloads them) are installed into /tmp/site with
# --no-deps and put on PYTHONPATH; where rrhf_fast does not import from this checkout (no `pip install -e .` there),
# rrhf_fast/kernels is linked to kernels/ and the checkout put on PYTHONPATH. Where $OUT is set (the device tool's
# run), gpu-check.log and gpu-check.tgz (every table this run wrote, at its path under the repository, and the logs
# under out/) are refreshed there after every stage: `tar xzf gpu-check.tgz` in the repository's root puts them in place.
# The exit status is 0 when every stage passed, 1 otherwise.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STAGES=0,1,2,3,4,5,6
DRY_RUN=0
RESULTS=
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --out) RESULTS=$2; shift ;;
        --stages) STAGES=0,$2; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (--dry-run, --out DIR, --stages 1,2,...)" >&2; exit 2 ;;
    esac
    shift
done

export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
    RESULTS=${RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-dry-run-XXXXXX")}
    DRY=(--dry-run)
    SCALE=3  # the dry run checks code paths on a shared CPU, not the GPU's minutes
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
else
    RESULTS=${RESULTS:-$ROOT/benchmarks/results}
    DRY=()
    SCALE=1
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOGS=$RESULTS/gpu-check-logs
[ "$DRY_RUN" = 1 ] || LOGS=${TMPDIR:-/tmp}/gpu-check-logs
mkdir -p "$LOGS"
LOG=$LOGS/gpu-check.log
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python; } || PY=python3
cd "$ROOT" || exit 1
START=$(date +%s)
MARKS=$(mktemp -d)  # files whose times say when the run and each stage began: what is newer, they wrote
RUN_MARK=$MARKS/run
touch "$RUN_MARK"

# --- set-up: the carried wheels, and rrhf_fast from this checkout
SITE=/tmp/site
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl 2>&1 | tee -a "$LOG"; then
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
        say "installed into $SITE: $(cd "$ROOT/.whl" && ls ./*.whl | sed 's|^\./||' | tr '\n' ' ')"
    else
        say "the wheels of .whl/ did not install: the optional rows are skipped"
    fi
else
    say "no .whl/ folder: nothing to install (benchmarks/gpu_wheels.sh fetches the optional libraries)"
fi
# asked from / as the drivers see it (a script's sys.path starts with its folder, not with the working directory)
kernels_dir() { (cd / && "$PY" -c 'import os, rrhf_fast.kernels as k; print(os.path.realpath(os.path.dirname(k.__file__)))' 2>/dev/null); }
if [ "$(kernels_dir)" != "$ROOT/kernels" ]; then
    [ -e "$ROOT/rrhf_fast/kernels" ] || ln -s ../kernels "$ROOT/rrhf_fast/kernels"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    say "rrhf_fast from $ROOT (rrhf_fast/kernels linked to kernels/; it was not installed from this checkout)"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# --- the stages
SUMMARY=()
FAILED=0

pack() {  # refresh $OUT/gpu-check.log and $OUT/gpu-check.tgz (this run's tables at their repository paths, the logs)
    [ -n "${OUT:-}" ] && [ -d "$OUT" ] || return 0
    cp "$LOG" "$OUT/gpu-check.log"
    local files
    mapfile -t files < <(cd "$ROOT" && find "${RESULTS#"$ROOT"/}" -maxdepth 1 -type f -newer "$RUN_MARK" 2>/dev/null)
    # the logs unpack under out/, which git ignores
    tar czf "$OUT/gpu-check.tgz.part" --transform "s|^$(basename "$LOGS")|out/$(basename "$LOGS")|" -C "$ROOT" "${files[@]}" \
        -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>>"$LOG" \
        && mv "$OUT/gpu-check.tgz.part" "$OUT/gpu-check.tgz"
}

step() {  # step LIMIT COMMAND...: one command under LIMIT seconds (times SCALE), its output to the log; its status
    local limit=$(( $1 * SCALE )); shift
    say "\$ $*"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    case $rc in
        0) ;;
        124|137) say "[timed out after $limit s]" ;;
        *) say "[exit $rc]" ;;
    esac
    STEPS_STATUS+=("$rc")
}

stage() {  # stage N NAME LIMIT KINDS: start a stage (KINDS: gpu_summary.py's table kinds); its steps follow
    STAGE_N=$1 STAGE_NAME=$2 STAGE_LIMIT=$3 STAGE_KINDS=$4 STAGE_T0=$(date +%s) STEPS_STATUS=()
    STAGE_MARK=$MARKS/stage-$1
    touch "$STAGE_MARK"
    say ""
    say "=== stage $1 $2 (limit $(( $3 * SCALE )) s)"
}

finish() {  # the stage's summary line, from its tables and its steps' statuses
    local seconds=$(( $(date +%s) - STAGE_T0 )) verdict=ok rc tables=() kind lines=()
    for rc in "${STEPS_STATUS[@]}"; do
        case $rc in
            0) ;;
            124|137) verdict="TIMED OUT"; break ;;
            *) verdict="FAILED (exit $rc)" ;;
        esac
    done
    [ "$verdict" = ok ] || FAILED=1
    mapfile -t tables < <(find "$RESULTS" -maxdepth 1 -name '*.csv' -newer "$STAGE_MARK")
    for kind in $STAGE_KINDS; do
        lines+=("$("$PY" benchmarks/gpu_summary.py "$kind" "${tables[@]}" 2>&1 | tail -1)")
    done
    local joined
    joined=$(printf ' | %s' "${lines[@]}")
    local line="stage $STAGE_N $STAGE_NAME: $verdict in $seconds s (limit $(( STAGE_LIMIT * SCALE )) s); ${joined:3}"
    SUMMARY+=("$line")
    say "$line"
    pack
}

wanted() { [[ ",$STAGES," == *",$1,"* ]]; }

LLAMA_1B=(--device cuda --dtype bfloat16 --preset llama-1b --prompt-lens 512 --response-lens 128 --ks 4 --repeats 1
          --warmup 1 --no-memory)
BODY_1B=(--device cuda --dtype bfloat16 --hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192
         --vocab 128256 --prompt-len 512 --response-len 128 --k 4 --groups 8 --max-tokens 1024 --repeats 3)

if wanted 0; then
    stage 0 versions 20 versions
    step 20 "$PY" benchmarks/gpu_versions.py --out "$RESULTS" "${DRY[@]}"
    finish
fi
if wanted 1; then
    stage 1 tests 110 tests
    step 110 "$PY" benchmarks/gpu_tests.py --out "$RESULTS" "${DRY[@]}"
    finish
fi
if wanted 2; then
    stage 2 loss 80 loss
    step 50 "$PY" benchmarks/bench_loss.py --device cuda --sizes 8192,4096,128256 --providers reference,triton,liger,cce \
        --out "$RESULTS" "${DRY[@]}"
    step 30 "$PY" benchmarks/bench_loss.py --device cuda --sizes 8192,4096,128256 --autocast --providers reference,triton \
        --out "$RESULTS" "${DRY[@]}"
    finish
fi
if wanted 3; then
    stage 3 probe 45 probe
    step 45 "$PY" benchmarks/bench_probe_cost.py --device cuda --models "llama-1b,$HOME/.cache/rrhf_fast/smollm2-135m-instruct" \
        --prompt-len 512 --response-len 128 -k 4 --groups 2 --steps 3 --out "$RESULTS" "${DRY[@]}"
    finish
fi
if wanted 4; then
    stage 4 step 150 "step prefix"
    # without checkpointing re-encoding 32 groups (82k tokens) runs out of memory: its rows say so; under it, the
    # step's 32 groups alone (8 already fit without), and no original, whose speedup the first table has
    step 50 "$PY" benchmarks/bench_step.py "${LLAMA_1B[@]}" --groups 8,32 \
        --variants original,reencode-fused,ours-packed,ours-kv-cache --label llama-1b-sdpa --out "$RESULTS" "${DRY[@]}"
    step 40 "$PY" benchmarks/bench_step.py "${LLAMA_1B[@]}" --groups 32 --variants reencode-fused,ours-packed \
        --gradient-checkpointing --label llama-1b-sdpa-ckpt --out "$RESULTS" "${DRY[@]}"
    step 10 "$PY" benchmarks/bench_prefix.py "${BODY_1B[@]}" --attn sdpa --modes none,packed,kv-cache --label llama-1b-sdpa \
        --out "$RESULTS" "${DRY[@]}"
    step 40 "$PY" benchmarks/bench_prefix.py "${BODY_1B[@]}" --attn flex_attention --modes none,packed \
        --label llama-1b-flex --out "$RESULTS" "${DRY[@]}"
    if "$PY" -c "import flash_attn" 2>/dev/null; then
        step 10 "$PY" benchmarks/bench_prefix.py "${BODY_1B[@]}" --attn flash_attention_2 --modes none,kv-cache \
            --label llama-1b-flash --out "$RESULTS" "${DRY[@]}"
    else
        say "flash-attn is not installed: its row is skipped (no wheel fits the 64 MiB a call carries: gpu_wheels.sh)"
    fi
    finish
fi
if wanted 5; then
    stage 5 sample 35 sample
    step 35 "$PY" benchmarks/bench_sample.py --device cuda --dtype bfloat16 --models smollm2-135m --queries 16 \
        --batch-sizes 16 -k 4 --prompt-lens 64-192 --max-new-tokens 32 --repeats 1 --out "$RESULTS" "${DRY[@]}"
    finish
fi
if wanted 6; then
    stage 6 fsdp 75 fsdp
    step 75 "$PY" benchmarks/bench_fsdp.py --device cuda --steps 5 --run-timeout $(( 33 * SCALE )) --out "$RESULTS" "${DRY[@]}"
    finish
fi

say ""
say "=== summary ($(( $(date +%s) - START )) s in all; tables in $RESULTS; log $LOG)"
for line in "${SUMMARY[@]}"; do say "$line"; done
pack
exit $FAILED
