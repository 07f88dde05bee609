#!/usr/bin/env bash
# The short CUDA check (issue 15, item 6): the fast and chapter configs, the classify benchmark
# and an FSDP run end to end on one GPU, each timed; a few minutes on an H200.
#
#   bash scripts/gpu_check.sh            # uses .venv/bin/python if there is one, else python
#   PYTHON=python3 KEEP=1 bash scripts/gpu_check.sh   # another interpreter; keep the outputs
#
# Targets on an H200 (issue 15): the 5-epoch chapter job <= 5 s with experiment=fast, <= 15 s
# with the chapter config. Everything is written under a temporary folder (printed; removed at
# the end unless KEEP=1). Exit status: 0 when every step passed.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/spam-gpu-check.XXXXXX")
if [[ "${KEEP:-0}" == "1" ]]; then
  trap 'echo "outputs kept in $TMP"' EXIT
else
  trap 'rm -rf "$TMP"' EXIT
fi
echo "gpu_check: python $PYTHON, outputs in $TMP"

# every run's files under $TMP: data splits, run folders, the trunk cache
COMMON=(model.weights=random "paths.data_dir=$TMP/data" "paths.log_dir=$TMP/outputs")
# each job builds its own trunk cache, as a single run from cold would
if grep -Eq '^[[:space:]]+shared:' conf/train.yaml; then
  COMMON+=(cache.shared=false)
fi

SUMMARY=()
FAILED=0
now() { date +%s.%N; }
# step NAME CMD...: run CMD with its output in $TMP/NAME.log (tail shown), record wall time
step() {
  local name=$1 start end secs rc=0
  shift
  echo
  echo "=== $name: $*"
  start=$(now)
  timeout "$STEP_TIMEOUT" "$@" >"$TMP/$name.log" 2>&1 || rc=$?
  end=$(now)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  grep -E "Training completed|accuracy:|GFLOP|msgs|phase|Error|error" "$TMP/$name.log" | tail -n 25 || true
  if [[ $rc -ne 0 ]]; then
    echo "--- $name failed (rc $rc); the log's tail:"
    tail -n 40 "$TMP/$name.log"
    FAILED=1
  fi
  echo "--- $name: ${secs} s wall, rc $rc"
  SUMMARY+=("$(printf '%-10s %8s s  rc %s' "$name" "$secs" "$rc")")
}

metrics() {  # metrics() RUN_DIR: a few fields of its metrics.json
  "$PYTHON" - "$1" <<'EOF' || true
import json, sys
from pathlib import Path
m = json.loads((Path(sys.argv[1]) / "metrics.json").read_text())
keys = ("training_seconds", "train_accuracy", "val_accuracy", "test_accuracy", "precision", "trunk_cache")
print("    " + ", ".join(f"{k}={m[k]}" for k in keys if k in m))
EOF
}

echo "=== nvidia-smi"
if ! command -v nvidia-smi >/dev/null; then
  echo "nvidia-smi not found: no NVIDIA driver here" >&2
  exit 1
fi
nvidia-smi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"

step fast "$PYTHON" train.py "${COMMON[@]}" experiment=fast trainer=gpu "hydra.run.dir=$TMP/fast"
metrics "$TMP/fast"
step chapter "$PYTHON" train.py "${COMMON[@]}" trainer=gpu "hydra.run.dir=$TMP/chapter"
metrics "$TMP/chapter"
step classify "$PYTHON" scripts/benchmark.py --device cuda --phases d_fp32,d_bf16,e_fp32 \
  --wait-idle 0 --out "$TMP/bench"
[[ -f "$TMP/bench/benchmark.md" ]] && cat "$TMP/bench/benchmark.md"
step fsdp "$PYTHON" train.py "${COMMON[@]}" model=gpt2-tiny trainer=fsdp trainer.devices=1 \
  trainer.max_epochs=1 "hydra.run.dir=$TMP/fsdp"
if [[ -f "$TMP/fsdp/bundle/model.safetensors" ]]; then
  echo "fsdp: bundle written ($(du -h "$TMP/fsdp/bundle/model.safetensors" | cut -f1))"
  step fsdp_load "$PYTHON" -c "from spam_lightning.inference.classify import Classifier; \
c = Classifier('$TMP/fsdp', device='cuda'); print('bundle loads; probs', c.predict_proba(['Win a prize now', 'See you at 5']).tolist())"
else
  echo "fsdp: no bundle at $TMP/fsdp/bundle/model.safetensors" >&2
  FAILED=1
  SUMMARY+=("fsdp       no bundle written")
fi

echo
echo "=== summary (targets on an H200: fast <= 5 s, chapter <= 15 s for the 5-epoch job)"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
