#!/usr/bin/env bash
# ftune's GPU checks in one prepared run, for a CUDA machine that may have no internet and little time:
#
#   make device-pack                            # on a machine with the package index: the Python wheels the GPU
#                                               # image may lack, the tokenizer cache and the data (see Makefile)
#   bash scripts/gpu_check.sh OUT [core|qlora]  # on the GPU machine, from the repository root, with them beside it
#
# core: the fused LoRA layer against peft's (pytest), the loop on CUDA with the tiny model (bf16 + packed SDPA,
#       torch.compile, gradient checkpointing, Liger, activation offloading), then the benchmark suite's SFT-LoRA on
#       the random Llama-3.2-1B against TRL (the H100 targets: >= 45% MFU, >= 1.3x TRL). Needs .device/ (about 28 MB).
# qlora: QLoRA 4-bit (bitsandbytes) on CUDA, tiny model and the random 1B. Needs .device/whl, .device/home,
#       .device/data/gsm8k and .device-qlora/ (the 43 MB bitsandbytes wheel; 66 MB in all).
# Each step has its own time limit and log; a failing step does not stop the next. OUT receives five files at most:
# summary.txt (every step's command, exit status, seconds and last lines; the short runs' losses), env.txt (GPU and
# package versions), bench.md and bench.json (the benchmark's table) and logs.tar.gz (every log); the runs themselves
# stay in a scratch directory (GPU_CHECK_WORK, default a new temporary one). GPU_CHECK_DEVICE=cpu runs the same steps
# on a CPU with tiny models (a check of this script itself, not of the GPU).
set -u
OUT=${1:?usage: bash scripts/gpu_check.sh OUT [core|qlora]}
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
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to WORK/logs/NAME.log, record status, seconds
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$SUMMARY"
  timeout "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc in $((SECONDS - t0)) s" | tee -a "$SUMMARY"
  tail -n 3 "$WORK/logs/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
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

if [ "$PART" = core ]; then
  step train-bf16-packed 180 "${FT[@]}" "${TINY[@]}" output_dir="$WORK/runs/bf16"
  step train-compile 240 "${FT[@]}" "${TINY[@]}" trainer.compile=true output_dir="$WORK/runs/compile"
  step train-checkpointing 180 "${FT[@]}" "${TINY[@]}" trainer.gradient_checkpointing=true output_dir="$WORK/runs/ckpt"
  if [ "$DEV" = cuda ]; then
    # the fused LoRA layer against peft's forward and backward on the GPU (float32 and bf16 autocast)
    step fused-lora 180 "$PY" -m pytest -q -p no:cacheprovider tests/peft/test_fused_lora.py -k cuda
    step train-liger 180 "${FT[@]}" "${TINY[@]}" trainer.liger=true output_dir="$WORK/runs/liger"
    step train-offload 180 "${FT[@]}" "${TINY[@]}" trainer.activation_offload=true output_dir="$WORK/runs/offload"
    step bench-1b-sft-lora 420 $PY -m scripts.bench --suite sft-lora --model "$BIG" --device cuda --seq-len 2048 \
      --batch-size 8 --packing on --examples 2000 --steps 20 --out "$WORK/bench"
  else
    step bench-tiny-sft-lora 420 $PY -m scripts.bench --suite sft-lora --model "$BIG" --device cpu --seq-len 256 \
      --batch-size 2 --packing on --examples 64 --steps 4 --out "$WORK/bench"
  fi
elif [ "$PART" = qlora ]; then
  step train-qlora 240 "${FT[@]}" "${TINY[@]}" peft=qlora peft.r=16 output_dir="$WORK/runs/qlora"
  big_dir=$($PY -c "from scripts.bench.models import model_dir; print(model_dir('$BIG'))" | tail -n 1)
  step train-qlora-big 300 "${FT[@]}" model=hub model.name_or_path="$big_dir" "${COMMON[@]}" "${BIG_RUN[@]}" \
    peft=qlora peft.r=16 output_dir="$WORK/runs/qlora-big"
else
  echo "unknown part $PART (core or qlora)" >&2
  exit 2
fi
# Losses of the short runs, side by side: each should fall and none be NaN.
$PY - "$WORK/runs" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("*")):
    f = run / "metrics.jsonl"
    losses = [r["loss"] for r in map(json.loads, f.read_text().splitlines()) if "loss" in r] if f.exists() else []
    print(f"{run.name:10s} losses {[round(x, 3) for x in losses]}")
EOF
if [ -f "$WORK/bench/summary.md" ]; then
  cp "$WORK/bench/summary.md" "$OUT/bench.md" && cp "$WORK/bench/summary.json" "$OUT/bench.json"
fi
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls -d bench 2>/dev/null)
echo "ftune gpu_check: results in $OUT, runs in $WORK"
