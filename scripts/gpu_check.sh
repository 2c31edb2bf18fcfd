#!/usr/bin/env bash
# The GPU machine's checks in one command (device tool; carry [".gpu"], prepared once with
#   mkdir -p .gpu && cp -r ../shared/wheels ../shared/data .gpu/ && echo /.gpu/ >> .git/info/exclude).
# Writes under $OUT: nvidia-smi.txt, pytest.log (eager vs captured/compiled step on CUDA),
# bench.jsonl (all modes beside the baseline, then a complete default run), and train.log
# with metrics.json of a default-configuration run of $STEPS steps.
set -uo pipefail
OUT=${OUT:-/tmp/gvae-gpu}; STEPS=${STEPS:-3000}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD GVAE_DATA_DIR=$PWD/.gpu/data PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest -q -p no:cacheprovider tests/test_step.py 2>&1 | tee "$OUT/pytest.log" | tail -3
python3 -m gvae.train train.max_steps="$STEPS" train.eval_every=1000 hydra.run.dir=/tmp/gvae-run 2>&1 \
  | tee "$OUT/train.log" | tail -4
cp /tmp/gvae-run/metrics.json "$OUT/metrics.json"
python3 scripts/bench.py --device cuda --steps 3000 --warmup 50 --full-run 2>&1 | tee "$OUT/bench.jsonl"
