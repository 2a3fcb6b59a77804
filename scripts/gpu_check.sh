#!/usr/bin/env bash
# What only a GPU can check, in one run and one report (about 6-8 minutes on one H100):
#   1. test_cuda.py: the model against transformers on the GPU (float32, bf16), packed attention
#      (sdpa, segments, flex) forward and backward against one response at a time;
#   2. short train.py runs on the demo's data on one GPU: DDP (torchrun, 1 process), --fsdp, and
#      --compile when train.py has it; their last metrics side by side, and plot.py's PNG of them;
#   3. bench.py in bf16 at Llama-3-8B width (2 blocks): the naive layout and the default with each
#      of sdpa, segments and flex, without and with --compile.
#
#   scripts/gpu_check.sh              # on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run    # the same steps on CPU at tiny sizes, flex left out (CPU has no
#                                     # flex backward), bench.py --compile with the aot_eager backend
#   OUT=dir scripts/gpu_check.sh      # also writes dir/report.md, dir/logs.txt (every step's whole
#                                     # output) and dir/train_runs.png
#
# Every step runs under `timeout`, and all steps share a time budget (GPU_CHECK_BUDGET_S, default 470 s
# on GPU, 1800 s dry, where each step's cap is also 3x): a step gets at most what is left, and a step with under 20 s left is skipped, so
# one hung step cannot eat the run. The report ends with a table of the steps; the exit code is 1 if
# any step failed, timed out or was skipped for time. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
# CPU steps take longer than GPU ones (and 2 shared cores far longer): the dry run's caps are 3x
SCALE=$([ $DRY = 1 ] && echo 3 || echo 1)
BUDGET=${GPU_CHECK_BUDGET_S:-$([ $DRY = 1 ] && echo 1800 || echo 470)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOGS=/dev/null
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && LOGS=$OUT/logs.txt && : >"$LOGS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the helper scripts below live in $WORK and import model.py
START=$SECONDS
SUMMARY=()
FAILED=0

# step NAME CAP_S COMMAND...: run COMMAND for at most CAP_S seconds (less if the budget has less),
# show its last lines in the report, append its whole output to the logs, record the result
step() {
    local name=$1 cap=$2 left rc t0 result
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        SUMMARY+=("| $name | SKIPPED: time budget spent | 0 |")
        FAILED=1  # an incomplete check is not a passed one
        return 1
    fi
    cap=$((cap * SCALE))
    ((cap > left)) && cap=$left
    echo "## $name"
    echo
    echo '```'
    echo "\$ $*"
    t0=$SECONDS
    echo "===== $name: $*" >>"$LOGS"
    timeout -k 10 "$cap" "$@" >"$WORK/step.log" 2>&1
    rc=$?
    cat "$WORK/step.log" >>"$LOGS"
    tail -n "${TAIL:-40}" "$WORK/step.log"
    echo '```'
    if ((rc == 0)); then
        result=ok
    elif ((rc == 124 || rc == 137)); then
        result="TIMED OUT after $cap s"
        FAILED=1
    else
        result="FAILED (exit $rc)"
        FAILED=1
    fi
    echo
    echo "$name: $result, $((SECONDS - t0)) s"
    echo
    SUMMARY+=("| $name | $result | $((SECONDS - t0)) |")
    return $rc
}

# the demo's model (4 blocks, width 128, demo/config.json) with fresh weights, as `python train.py` builds it
cat >"$WORK/make_init.py" <<'PYTHON'
import os, sys
import torch
from model import Llama, LlamaConfig
torch.manual_seed(0)
Llama(LlamaConfig.from_json(os.path.join("demo", "config.json"))).save_pretrained(sys.argv[1], source_dir="demo")
print("wrote", sys.argv[1])
PYTHON

# the last train and eval records of each run in one table; fails when a run has no final/ or a non-finite loss
cat >"$WORK/summarize_runs.py" <<'PYTHON'
import json, math, os, sys
ok = True
print("| run | steps | train loss | eval loss | eval pair_acc | eval top1_acc | groups/s | peak memory (GB) |")
print("|---|---|---|---|---|---|---|---|")
for run in sys.argv[1:]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(run, "final", "config.json")):
        print(f"| {os.path.basename(run)} | no metrics.jsonl or final/ | | | | | | |")
        ok = False
        continue
    records = [json.loads(line) for line in open(path) if line.strip()]
    train = [r for r in records if r["split"] == "train"][-1]
    ev = [r for r in records if r["split"] == "eval"][-1]
    ok &= all(math.isfinite(r["loss"]) for r in (train, ev))
    nan = float("nan")
    print(f"| {os.path.basename(run)} | {train['step']} | {train['loss']:.4f} | {ev['loss']:.4f} | {ev.get('pair_acc', nan):.3f} "
          f"| {ev.get('top1_acc', nan):.3f} | {train.get('groups_per_s', nan):.1f} | {train.get('peak_mem_gb', nan):.2f} |")
sys.exit(0 if ok else 1)
PYTHON

cat >"$WORK/environment.py" <<'PYTHON'
import sys
import torch, transformers
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| transformers", transformers.__version__, "| python", sys.version.split()[0])
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    raise SystemExit("error: no CUDA device visible to torch (scripts/gpu_check.sh --dry-run runs on CPU)")
PYTHON

main() {
    local device eval_data test_env=() train_device=() bench_common bench_impls bench_compile steps runs=()
    if ((DRY)); then
        device=cpu
        test_env=(env MPPO_TEST_DEVICE=cpu)
        train_device=(--device cpu)
        head -n 64 demo/eval.jsonl >"$WORK/eval.jsonl"
        eval_data=$WORK/eval.jsonl
        steps=(--max_steps 4 --log_every 2 --eval_every 2 --save_every 2)
        bench_common=(--tiny --device cpu)
        bench_impls=(sdpa segments)
        bench_compile=(--compile --compile_backend aot_eager)
    else
        device=cuda
        eval_data=demo/eval.jsonl
        steps=(--max_steps 20 --log_every 5 --eval_every 10 --save_every 10)
        # Llama-3-8B width, 2 blocks, bf16, 4 groups of 4 responses per step, 5 timed steps per row
        bench_common=(--device cuda --dtype bfloat16 --shape llama3-8b --layers 2 --steps 5)
        bench_impls=(sdpa segments flex)
        bench_compile=(--compile)
    fi

    echo "# mppo GPU check$( ((DRY)) && echo ' (dry run on CPU)')"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        [ -n "$(git status --porcelain 2>/dev/null)" ] && echo ' plus uncommitted changes'), time budget $BUDGET s"
    echo

    step "environment" 60 "$PY" "$WORK/environment.py" "$device"
    if ! ((DRY)) && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
        echo
    fi

    step "CUDA tests (test_cuda.py)" 200 "${test_env[@]}" "$PY" -m pytest -q -rs -p no:cacheprovider test_cuda.py

    local train=(-m torch.distributed.run --standalone --nproc_per_node 1 train.py --model "$WORK/init"
        --data demo/train.jsonl --eval_data "$eval_data" --loss pair_mnm --batch_size 32 --micro_batch_size 16 --lr 1e-3
        --max_length 64 --max_prompt_length 32 --seed 0 "${steps[@]}" "${train_device[@]}")
    if step "demo model" 60 "$PY" "$WORK/make_init.py" "$WORK/init"; then
        step "train.py, DDP (torchrun, 1 process)" 100 "$PY" "${train[@]}" --out "$WORK/ddp" && runs+=("$WORK/ddp")
        step "train.py --fsdp (torchrun, 1 process)" 100 "$PY" "${train[@]}" --fsdp --out "$WORK/fsdp" && runs+=("$WORK/fsdp")
    fi

    step "bench.py: naive, default with ${bench_impls[*]}" 200 \
        "$PY" bench.py "${bench_common[@]}" --timeout $((100 * SCALE)) --attn_impl "${bench_impls[@]}"
    if [ ! -d "$WORK/init" ]; then
        SUMMARY+=("| train.py --compile | skipped: no demo model | 0 |")
    elif "$PY" train.py --help 2>/dev/null | grep -q -- "--compile"; then
        step "train.py --compile, DDP (torchrun, 1 process)" 150 "$PY" "${train[@]}" --compile --out "$WORK/compiled" \
            && runs+=("$WORK/compiled")
    else
        SUMMARY+=("| train.py --compile | skipped: train.py has no --compile | 0 |")
    fi

    # last, as the longest: each of its 1 + ${#bench_impls[@]} layouts compiles; each gets an equal share of the
    # time left (at most 150 s), so one layout that never finishes compiling fails its own row only
    local share=$(((BUDGET - (SECONDS - START) - 60) / (1 + ${#bench_impls[@]})))
    ((share > 150 * SCALE)) && share=$((150 * SCALE))
    ((share < 30)) && share=30
    step "bench.py --compile: naive, default with ${bench_impls[*]}" 300 \
        "$PY" bench.py "${bench_common[@]}" --timeout "$share" --attn_impl "${bench_impls[@]}" "${bench_compile[@]}"

    if ((${#runs[@]})); then
        step "the training runs' last metrics" 30 "$PY" "$WORK/summarize_runs.py" "${runs[@]}"
        if "$PY" -c "import matplotlib" 2>/dev/null; then
            step "plot.py of the training runs" 60 "$PY" plot.py "${runs[@]}" --output "${OUT:-$WORK}/train_runs.png" \
                --title "gpu_check: demo data, pair_mnm"
        else
            SUMMARY+=("| plot.py | skipped: no matplotlib | 0 |")
        fi
    fi

    echo "## summary"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "total $((SECONDS - START)) s$([ -n "${OUT:-}" ] && echo "; every step's whole output is in $LOGS")"
    return $FAILED
}

if [ -n "${OUT:-}" ]; then
    main 2>&1 | tee "$OUT/report.md"
    exit "${PIPESTATUS[0]}"
fi
main 2>&1
