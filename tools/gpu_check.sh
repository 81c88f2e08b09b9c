#!/usr/bin/env bash
# One command for the first machine with a CUDA GPU: do the Triton kernels, the benchmark and compiled
# training hold up on real hardware? Within about 8 minutes in all, each part under its own timeout:
#
#   1. kernel tests on CUDA (tests/kernels/test_correctness.py, PRETRAIN_TEST_DEVICE=cuda): forward and
#      backward of every op against the fp64 reference in fp32, fp16 and bf16 (one pytest per dtype, in
#      parallel: most of their time is Triton compiling kernels, which is single-threaded per process);
#   2. 50 steps of configs/gpt2-124m.yaml on one GPU in bf16, train.compile=false and then true, on shards
#      tokenized from this repository's own text (the GPU machine has no internet and no OpenWebText);
#      prints tokens/s and MFU (medians over steps 11-50, from each run's metrics.jsonl);
#   3. the kernel benchmark (`pretrain bench kernels`: correctness on CUDA, then the speed and memory sweep
#      against torch eager, torch.compile and SDPA): kernels.csv, correctness.csv and plots/*.png.
#
# Everything goes to $RESULTS (tools/results/ by default; commit its CSVs, plots and gpu_check.log). The
# parts run in this order so that the slowest and most elastic, the sweep, gets the time left; its CSV is
# rewritten after each op, so a timeout keeps what was measured, and the plots are then drawn from it.
#
# Python: GPU_CHECK_PYTHON, else .venv/bin/python, else python3: on a lent GPU machine (the device tool), that
# machine's own Python 3.12 with its CUDA torch and Triton. What the project needs and that machine lacks
# (pydantic, DeepSpeed, webdataset, ...) travels as wheels in .whl/, made here by `make gpu-wheels`
# (tools/gpu_wheels.sh, under 64 MiB) and installed into a scratch target at the start, no network needed.
# Ray and W&B do not travel: without Ray the training part runs the same loop in-process on one GPU
# (tools/train_solo.py), W&B off. The package is imported from this tree (PYTHONPATH), never installed.
# The device call, from the repository root:  tools/gpu_check.sh   with carry [".whl"].
#
#   tools/gpu_check.sh          the GPU parts on a CUDA machine; without CUDA, the CPU parts (and says so)
#   tools/gpu_check.sh --cpu    only the CPU-checkable parts: the benchmark's quick sweep under the Triton
#                               interpreter (correctness, CSV, plots), into bench-out/gpu_check-cpu/
# Env: GPU_CHECK_RESULTS (output dir), GPU_CHECK_OPS / GPU_CHECK_DTYPE (the sweep's --ops / --dtype),
#      GPU_CHECK_BUDGET_S (480: the whole run's deadline), GPU_CHECK_PYTHON.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
CPU_ONLY=0
case "${1:-}" in
  --cpu) CPU_ONLY=1 ;;
  "") ;;
  *) echo "usage: tools/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
DATA=$WORK/data
trap 'rm -rf "$WORK"' EXIT
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ROOT WORK DATA PYTHONPATH WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true

SUMMARY=()
FAILED=0
note() { printf '\n=== %s  (%ds elapsed)\n' "$*" "$SECONDS"; }
record() {
  SUMMARY+=("$(printf '%-5s %s' "$1" "$2")")
  if [[ $1 == FAIL ]]; then FAILED=1; fi
}

# run_part NAME TIMEOUT_S CMD...: runs CMD (a program or an exported function) under min(TIMEOUT_S, what is
# left of the budget) and records the verdict. timeout signals CMD's whole process group.
run_part() {
  local name=$1 limit=$2 left rc=0
  shift 2
  left=$((BUDGET_S - SECONDS))
  if (( limit > left )); then limit=$left; fi
  if (( limit < 15 )); then
    echo "$name: skipped, the ${BUDGET_S}s budget is spent"
    record SKIP "$name (budget spent)"
    return 0
  fi
  note "$name (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" bash -c '"$@"' run_part "$@" || rc=$?
  if (( rc == 0 )); then record PASS "$name"
  elif (( rc == 124 || rc == 137 )); then record FAIL "$name (timed out after ${limit}s)"
  else record FAIL "$name (exit $rc)"; fi
}

# ------------------------------------------------------------------ the parts (exported for `timeout`)
kernel_tests() {
  local pids=() rc=0 d i
  for d in fp32 fp16 bf16; do
    PRETRAIN_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_correctness.py \
      -k "$d" > "$WORK/pytest-$d.log" 2>&1 &
    pids+=($!)
  done
  for i in 0 1 2; do wait "${pids[$i]}" || rc=1; done
  for d in fp32 fp16 bf16; do echo "--- $d"; tail -n 25 "$WORK/pytest-$d.log"; done
  return $rc
}

make_data() {  # this repository's own source and docs in GPT-2 BPE (the tokenizer ships in a Python package)
  local files
  mapfile -t files < <(find "$ROOT/pretrain" "$ROOT/tests" "$ROOT/tools" "$ROOT/configs" \
    -type f \( -name '*.py' -o -name '*.md' -o -name '*.yaml' \) -not -path '*/results/*' | sort)
  "$PY" -m pretrain.cli data text --tokenizer gpt2 --out "$DATA" --seq-len 1024 --val-fraction 0.05 \
    "${files[@]}"
}

train_run() {  # train_run COMPILE: 50 steps of 16 x 1024 tokens (one micro-batch a step), no checkpoints
  local launch=(-m pretrain.cli train)  # on Ray where it is installed, else the same loop in this process
  if ! "$PY" -c 'import ray' 2>/dev/null; then launch=("$ROOT/tools/train_solo.py"); fi
  "$PY" "${launch[@]}" configs/gpt2-124m.yaml \
    run.dir="$WORK/runs" run.name="gpt2-124m-compile-$1" train.compile="$1" \
    data.train="$DATA/train" data.val="$DATA/val" data.num_workers=2 \
    cluster.workers=1 cluster.use_gpu=true train.precision=bf16 \
    train.steps=50 train.micro_batch_size=16 train.global_batch_size=16 schedule.warmup_steps=5 \
    eval.every=0 eval.batches=1 checkpoint.every=0 train.log_every=10 log.wandb=false
}

train_report() {  # medians over steps 11-50 of each run's metrics.jsonl
  "$PY" - "$WORK/runs" <<'PYEOF'
import json
import statistics
import sys
from pathlib import Path

for name in ("gpt2-124m-compile-false", "gpt2-124m-compile-true"):
    run = Path(sys.argv[1]) / name
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in rows if "tokens_per_s" in r and r["step"] > 10]
    if not steps:
        print(f"{name}: no step rows")
        continue
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    mfu = [r["mfu"] for r in steps if r.get("mfu") is not None]
    shown = f"MFU {100 * statistics.median(mfu):.1f}%" if mfu else "MFU n/a (device not in the peak table)"
    print(f"{name}: {statistics.median(r['tokens_per_s'] for r in steps):,.0f} tokens/s  {shown}  "
          f"step {1e3 * statistics.median(r['step_time_s'] for r in steps):.0f} ms  "
          f"final loss {summary.get('final_loss')}  first step after {summary.get('time_to_first_step_s')} s")
PYEOF
}

plot_partial() {  # plots from a CSV that a timed-out sweep left
  "$PY" -c 'import sys; from pathlib import Path; from pretrain.bench import report
d = Path(sys.argv[1]); print(len(report.plot(report.read_csv(d / "kernels.csv"), d / "plots")), "plots")' "$1"
}
export -f kernel_tests make_data train_run train_report plot_partial

environment() {
  "$PY" - <<'PYEOF'
import importlib.util
import platform

import torch

print(f"host {platform.node()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}  {p.total_memory / 2**30:.0f} GiB  sm_{p.major}{p.minor}  "
          f"x{torch.cuda.device_count()}")
# Found, not imported: importing deepspeed and ray alone takes seconds.
wanted = ("triton", "pytest", "typer", "rich", "matplotlib", "numpy", "pydantic", "yaml", "deepspeed", "ray",
          "webdataset", "tokenizers", "wandb")
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
print("missing modules: " + (", ".join(missing) if missing else "none"))
PYEOF
}

sweep_args() {  # the benchmark's options: out dir, then the env's --ops / --dtype
  SWEEP=(--out "$RESULTS/kernels" --no-wandb "$@")
  if [[ -n ${GPU_CHECK_OPS:-} ]]; then SWEEP+=(--ops "$GPU_CHECK_OPS"); fi
  if [[ -n ${GPU_CHECK_DTYPE:-} ]]; then SWEEP+=(--dtype "$GPU_CHECK_DTYPE"); fi
  rm -rf "${RESULTS:?}/kernels"
}

pick_python() {
  if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then PY=$GPU_CHECK_PYTHON
  elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
  else PY=python3
  fi
  # The carried wheels, where this Python lacks what they hold (a lent machine): into a scratch target.
  if compgen -G ".whl/*.whl" > /dev/null && ! "$PY" -c 'import pydantic, deepspeed, webdataset' 2>/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheels into $WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
    PYTHONPATH="$PYTHONPATH:$WORK/site"
    export PYTHONPATH
  elif ! "$PY" -c 'import pydantic' 2>/dev/null; then
    echo "$PY lacks the project's dependencies and no wheels were carried: run 'make gpu-wheels' here and"
    echo "carry .whl with the tree (the device tool's carry), or point GPU_CHECK_PYTHON at a set-up Python."
  fi
}

main() {
  if [[ -n $PRE_OUT ]]; then echo "$PRE_OUT"; fi
  note "environment: $PY"
  echo "$ENV_OUT"
  if [[ $ENV_OK == 0 ]]; then echo "FAIL: $PY cannot import torch"; return 2; fi
  if [[ $FALLBACK == 1 ]]; then
    echo "torch sees no CUDA device (a CPU-only torch, or no GPU): running the CPU-checkable parts only."
  fi

  if [[ $CPU_ONLY == 1 ]]; then
    sweep_args --quick
    run_part "kernel correctness + quick sweep under the Triton interpreter (CPU)" 900 \
      env CUDA_VISIBLE_DEVICES= "$PY" -m pretrain.bench.kernels "${SWEEP[@]}"
    record SKIP "GPU parts: kernel tests on CUDA, gpt2-124m compile off/on, GPU benchmark (no CUDA or --cpu)"
  else
    run_part "kernel tests on CUDA (fp32, fp16, bf16; forward + backward vs references)" 150 kernel_tests
    run_part "shards for gpt2-124m from the repository's text" 60 make_data
    local c
    for c in false true; do
      if [[ -f $DATA/train/index.json ]]; then
        local limit=100
        if [[ $c == true ]]; then limit=150; fi  # compiling the model takes its own minute
        run_part "gpt2-124m bf16, 1 GPU, 50 steps, train.compile=$c" "$limit" train_run "$c"
      else
        record SKIP "gpt2-124m train.compile=$c (no shards)"
      fi
    done
    note "gpt2-124m tokens/s and MFU (medians over steps 11-50)"
    train_report || true
    sweep_args
    run_part "kernel benchmark: correctness on CUDA, speed and memory sweep (CSV + plots)" 240 \
      "$PY" -m pretrain.bench.kernels "${SWEEP[@]}"
    if [[ -f $RESULTS/kernels/kernels.csv && ! -d $RESULTS/kernels/plots ]]; then
      plot_partial "$RESULTS/kernels" || true
    fi
  fi
  note "summary"
  printf '%s\n' "${SUMMARY[@]}"
  echo "results: $RESULTS (log: $LOG)"
  return "$FAILED"
}

# Before the log exists: whether there is a GPU decides where results go (CPU ones never to tools/results).
pick_python > "$WORK/pre.log" 2>&1 || true  # in this shell (not $(...)), so that PY stays set
PRE_OUT=$(cat "$WORK/pre.log")
export PY
ENV_OK=1
ENV_OUT=$(environment 2>&1) || ENV_OK=0
FALLBACK=0
if [[ $CPU_ONLY == 0 && $ENV_OUT != *"available True"* ]]; then CPU_ONLY=1 FALLBACK=1; fi
if [[ $CPU_ONLY == 1 ]]; then
  RESULTS=${GPU_CHECK_RESULTS:-bench-out/gpu_check-cpu}
else
  RESULTS=${GPU_CHECK_RESULTS:-tools/results}
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG=$RESULTS/gpu_check.log
main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
