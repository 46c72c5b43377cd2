#!/usr/bin/env bash
# Runs each shipped recipe once (as the recipe headers describe) and prints the figures for benchmarks/README.md.
# Usage: bash scripts/measure_recipes.sh [recipe ...]   (default: all of them). Needs FTUNE_DATA_DIR for GSM8K/HH.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FTUNE_DATA_DIR="${FTUNE_DATA_DIR:-../shared/data}"
out="${MEASURE_DIR:-/tmp/ftune-measure}"
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(quickstart lora_hh_dpo lora_gsm8k_pso)
# Shortened runs (their headers say so): a whole epoch takes hours on a 2-core CPU.
declare -A extra=([lora_gsm8k]="trainer.max_steps=20 trainer.save_every=0 trainer.eval_every=0 eval.limit=50"
                  [manyicl_gsm8k]="trainer.max_steps=4 trainer.save_every=0 eval.limit=8 eval.shots=[0,many]")
for r in "${recipes[@]}"; do
  rm -rf "$out/$r"
  start=$(date +%s)
  # shellcheck disable=SC2086
  /usr/bin/time -f "%M" -o "$out.$r.rss" nice -n "${MEASURE_NICE:-0}" .venv/bin/ftune train +recipe="$r" output_dir="$out/$r" trainer.progress=false \
    ${extra[$r]:-} > "$out.$r.log" 2>&1 || { echo "$r FAILED (log: $out.$r.log)"; continue; }
  end=$(date +%s)
  python3 - "$out/$r" "$r" "$((end - start))" "$(cat "$out.$r.rss")" <<'PY'
import json, sys
run, name, secs, rss_kb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = json.load(open(f"{run}/summary.json"))
acc = lambda m: ", ".join(f"{k} {v:.3f}" for k, v in (m or {}).items() if k.endswith("accuracy"))
print(f"{name}: wall {secs}s, peak RSS {rss_kb / 1e6:.2f} GB, {s['steps']} steps, {s['train_tokens']:.0f} tokens, "
      f"{s['tokens_per_s']:.0f} tok/s, final loss {s['final_loss']:.4f}, held-out {s['eval']}, "
      f"task before: [{acc(s['task_start'])}] after: [{acc(s['task_end'])}]")
PY
done
