#!/usr/bin/env bash
# ftune's GPU checks in one prepared run, for a CUDA machine that may have no internet and little time:
#
#   make device-pack                                # on a machine with the package index: the Python wheels the GPU
#                                                   # image may lack, the tokenizer cache and the data (see Makefile)
#   bash scripts/gpu_check.sh OUT [core|qlora|attention|all]  # on the GPU machine, from the repository root, with
#                                                   # them beside it
#
# core: the loop on CUDA with the tiny model (bf16 + packed SDPA, torch.compile, gradient checkpointing, Liger,
#       activation offloading) and the fused LoRA layer against peft's (pytest), side by side; then, alone, the
#       benchmark suite's SFT-LoRA on the random Llama-3.2-1B against TRL (the H100 targets: >= 45% MFU, >= 1.3x
#       TRL). Needs .device/ (about 30 MB).
# qlora: QLoRA 4-bit (bitsandbytes) on CUDA, tiny model and the random 1B. Needs .device/ and .device-qlora/ (the
#       bitsandbytes wheel, slimmed to 7 MB by `make device-pack`).
# attention: packed rows with attention per example (model.packed_attention=per_example, the CPU default) against
#       the whole row under transformers' mask (masked, the GPU default): ftune alone on the random 1B, one line
#       each in summary.txt (tokens/s, peak memory, mean loss; about 3 minutes on an H200). Its correctness test
#       runs in core.
# all: core and qlora; on CUDA also SFT-LoRA without packing (64 rows a step, grouped by length: TRL's packing is
#       padding-free, cheap only with FlashAttention's varlen kernels) after the packed suite, and at the end the full
#       fine-tuning and DPO suites on the random 1B against TRL.
# Each step has its own time limit and log; a failing step does not stop the next. GPU_CHECK_BUDGET=SECONDS caps
# the steps' time together: a step gets at most what is left and is skipped when less than a minute is. OUT receives
# seven files at most: summary.txt (every step's command, exit status, seconds and last lines, more of them when it
# failed; the short runs' losses), env.txt (GPU and package versions), bench.md and bench.json (the SFT-LoRA table,
# copied as soon as it exists), bench-padded.md and bench-more.md (SFT-LoRA unpacked; full-ft and DPO; their JSON is
# in the logs) and logs.tar.gz (every log and suite file); the runs themselves stay in a scratch directory
# (GPU_CHECK_WORK, default a new temporary one). GPU_CHECK_DEVICE=cpu runs the same steps on a CPU with tiny models
# (a check of this script itself, not of the GPU).
set -u
OUT=${1:?usage: bash scripts/gpu_check.sh OUT [core|qlora|attention|all]}
PART=${2:-core}
DEV=${GPU_CHECK_DEVICE:-cuda}
PY=${PY:-python3}
WORK=${GPU_CHECK_WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK/logs"
wheels=$(ls .device/whl/*.whl .device/whl-bench/*.whl .device-qlora/*.whl 2>/dev/null)
if [ "$DEV" = cuda ] && [ -n "$wheels" ]; then
  # --no-deps: the image's own torch, numpy, pyarrow ... stay; only the packages carried here are added.
  # shellcheck disable=SC2086
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ftune-site \
    $wheels || exit 1
  export PYTHONPATH=/tmp/ftune-site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .device/home ] && export FTUNE_HOME=${FTUNE_HOME:-$PWD/.device/home}
[ -d .device/data ] && export FTUNE_DATA_DIR=${FTUNE_DATA_DIR:-$PWD/.device/data}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

SUMMARY=$OUT/summary.txt
BUDGET=${GPU_CHECK_BUDGET:-0}
BUDGET_T0=$SECONDS
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to WORK/logs/NAME.log, record status, seconds
  local name=$1 limit=$2
  shift 2
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - (SECONDS - BUDGET_T0)))
    if [ "$left" -lt 60 ]; then
      echo "== $name: skipped, $left s of GPU_CHECK_BUDGET left" | tee -a "$SUMMARY"
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  local t0=$SECONDS
  echo "== $name: started" >&2
  timeout "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  local rc=$?
  local lines=3
  [ "$rc" -ne 0 ] && lines=25
  # one append per step, so that steps run side by side do not interleave their lines
  printf '== %s: %s\n   exit %s in %s s\n%s\n' "$name" "$*" "$rc" "$((SECONDS - t0))" \
    "$(tail -n "$lines" "$WORK/logs/$name.log" | cut -c1-400 | sed 's/^/   | /')" | tee -a "$SUMMARY"
}
# The tiny runs are small next to a GPU and its host: there they run side by side (GPU_CHECK_PARALLEL=1, the default
# on CUDA), then `wait`; the benchmark always runs alone.
PARALLEL=${GPU_CHECK_PARALLEL:-$([ "$DEV" = cuda ] && echo 1 || echo 0)}
spawn() {
  if [ "$PARALLEL" = 1 ]; then step "$@" & else step "$@"; fi
}
copy_bench() {  # copy_bench DIR NAME: the suite's table into OUT as soon as it exists (the JSON for the first only)
  if [ -f "$1/summary.md" ]; then
    cp "$1/summary.md" "$OUT/$2.md"
    [ "$2" = bench ] && cp "$1/summary.json" "$OUT/$2.json"
  fi
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "accelerate", "peft", "datasets", "trl", "hydra", "bitsandbytes",
             "liger_kernel", "triton"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:  # noqa: BLE001 - a missing package is what this line is for
        print(name, "MISSING", type(e).__name__, e)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

COMMON=(data=gsm8k data.limit=256 data.eval_size=0 data.packing=true trainer.lr=5e-3 trainer.mixed_precision=bf16
        trainer.log_every=1 trainer.progress=false eval=none)
TINY=(model=tiny_random "${COMMON[@]}" data.max_length=512 trainer.max_steps=6 trainer.batch_size=4)
if [ "$DEV" = cuda ]; then
  BIG=llama_1b_random; BIG_RUN=(data.max_length=2048 trainer.batch_size=8 trainer.max_steps=10)
else
  BIG=llama_tiny_random; BIG_RUN=(data.max_length=256 trainer.batch_size=2 trainer.max_steps=3)
fi
FT=("$PY" -m ftune.cli train)  # an array, not a function: `timeout` runs programs only

tiny_checks() {  # the loop on the tiny model with each GPU feature; on CUDA also the fused LoRA layer against peft's
  spawn train-bf16-packed 180 "${FT[@]}" "${TINY[@]}" output_dir="$WORK/runs/bf16"
  spawn train-compile 240 "${FT[@]}" "${TINY[@]}" trainer.compile=true output_dir="$WORK/runs/compile"
  spawn train-checkpointing 180 "${FT[@]}" "${TINY[@]}" trainer.gradient_checkpointing=true output_dir="$WORK/runs/ckpt"
  if [ "$DEV" = cuda ]; then
    # forward and backward on the GPU (float32 and bf16 autocast); the image's own pytest plugins are left out (they
    # may not suit the pytest carried here)
    spawn fused-lora 180 env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 FTUNE_TEST_HOME="${FTUNE_HOME:-}" \
      "$PY" -m pytest -q -p no:cacheprovider tests/peft/test_fused_lora.py tests/test_packed_attention.py -k cuda
    spawn train-liger 180 "${FT[@]}" "${TINY[@]}" trainer.liger=true output_dir="$WORK/runs/liger"
    spawn train-offload 180 "${FT[@]}" "${TINY[@]}" trainer.activation_offload=true output_dir="$WORK/runs/offload"
  fi
}
qlora_tiny() {
  spawn train-qlora 240 "${FT[@]}" "${TINY[@]}" peft=qlora peft.r=16 output_dir="$WORK/runs/qlora"
}
bench_sft_lora() {  # alone on the machine: its timings are the point
  if [ "$DEV" = cuda ]; then
    step bench-1b-sft-lora 420 "$PY" -m scripts.bench --suite sft-lora --model "$BIG" --device cuda --seq-len 2048 \
      --batch-size 8 --packing on --examples 2000 --steps 20 --out "$WORK/bench"
  else
    step bench-tiny-sft-lora 420 "$PY" -m scripts.bench --suite sft-lora --model "$BIG" --device cpu --seq-len 256 \
      --batch-size 2 --packing on --examples 64 --steps 4 --out "$WORK/bench"
  fi
  copy_bench "$WORK/bench" bench
}
qlora_big() {
  big_dir=$($PY -c "from scripts.bench.models import model_dir; print(model_dir('$BIG'))" | tail -n 1)
  step train-qlora-big 300 "${FT[@]}" model=hub model.name_or_path="$big_dir" "${COMMON[@]}" "${BIG_RUN[@]}" \
    peft=qlora peft.r=16 output_dir="$WORK/runs/qlora-big"
}
bench_padded() {  # SFT-LoRA without packing, 64 rows a step grouped by length: TRL's default packing is padding-free,
  # one flattened row that only FlashAttention's variable-length kernels attend to cheaply (SDPA masks the whole row)
  step bench-1b-sft-lora-padded 300 "$PY" -m scripts.bench --suite sft-lora --model "$BIG" --device cuda \
    --seq-len 2048 --batch-size 64 --packing off --group-by-length --examples 2000 --steps 20 \
    --out "$WORK/bench-padded"
  copy_bench "$WORK/bench-padded" bench-padded
}
bench_more() {  # full fine-tuning and DPO on the random 1B against TRL (CUDA only: on a CPU the 1B is too slow)
  step bench-1b-full-ft-dpo 420 "$PY" -m scripts.bench --suite full-ft,dpo --model "$BIG" --device cuda \
    --seq-len 2048 --batch-size 8 --packing on --examples 2000 --steps 20 --out "$WORK/bench-more"
  copy_bench "$WORK/bench-more" bench-more
}
bench_attention() {  # packed rows: attention per example against the whole row under a mask, ftune alone, each alone
  local how size
  if [ "$DEV" = cuda ]; then size=(--seq-len 2048 --batch-size 8 --examples 2000 --steps 12)
  else size=(--seq-len 256 --batch-size 2 --examples 64 --steps 4); fi
  for how in per_example masked; do
    step "bench-attention-$how" 240 "$PY" scripts/bench_train.py --model "$BIG" --device "$DEV" --packing on \
      "${size[@]}" --only ftune --ftune-override model.packed_attention=$how --out "$WORK/bench-attention/$how.json"
  done
  $PY - "$WORK/bench-attention" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
for how in ("per_example", "masked"):
    f = Path(sys.argv[1]) / f"{how}.json"
    r = json.loads(f.read_text())["results"][0] if f.exists() else {}
    print(f"attention {how:12s} tok/s {r.get('tokens_per_s')}  peak MiB {r.get('peak_memory_mib')}  "
          f"loss {r.get('mean_loss')}  exit {r.get('exit_code')}")
EOF
}
case $PART in
  core) tiny_checks; wait; bench_sft_lora ;;
  qlora) qlora_tiny; wait; qlora_big ;;
  attention) bench_attention ;;
  all) tiny_checks; qlora_tiny; wait; bench_sft_lora; [ "$DEV" = cuda ] && bench_padded; qlora_big
       [ "$DEV" = cuda ] && bench_more ;;
  *) echo "unknown part $PART (core, qlora, attention or all)" >&2; exit 2 ;;
esac
# Losses of the short runs, side by side: each should fall and none be NaN.
$PY - "$WORK/runs" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("*")):
    f = run / "metrics.jsonl"
    losses = [r["loss"] for r in map(json.loads, f.read_text().splitlines()) if "loss" in r] if f.exists() else []
    print(f"{run.name:10s} losses {[round(x, 3) for x in losses]}")
EOF
# shellcheck disable=SC2046
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls -d bench bench-padded bench-more bench-attention 2>/dev/null)
echo "ftune gpu_check: results in $OUT, runs in $WORK"
