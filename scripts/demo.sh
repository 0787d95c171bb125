#!/usr/bin/env bash
# The main job on the embedded default (CPU, the `debug` model, built-in synthetic data):
# pretrain dense -> upcycle to MoE -> continue training the MoE -> export to Hugging Face ->
# generate with transformers. Takes about a minute on a 2-core CPU. Rerunning resumes or skips.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}

step() { printf '\n== %s\n' "$*"; }

step "1/5 pretrain the dense debug model (300 steps, CPU)"
mujina-train --config configs/debug.yaml --out "$OUT/dense"

step "2/5 upcycle it into a Mixture-of-Experts (4 experts, top-2)"
mujina-model upcycle --checkpoint "$OUT/dense/final" --experts 4 --top-k 2 --out "$OUT/moe-init"

step "3/5 continue training the MoE (load-balancing and z-loss on)"
mujina-train --config configs/debug-moe.yaml --set init_from="$OUT/moe-init" --out "$OUT/moe"

step "4/5 export to Hugging Face format (MixtralForCausalLM)"
mujina-model export --checkpoint "$OUT/moe/final" --out "$OUT/hf"

step "5/5 generate with transformers: the data are arithmetic progressions, so 10 13 16 -> 19 22 25 ..."
mujina-model sample --hf "$OUT/hf" --prompt-ids 1,10,13,16 --max-new-tokens 12

printf '\nDone. Metrics: %s/*/metrics.jsonl; the exported model: %s/hf\n' "$OUT" "$OUT"
