#!/usr/bin/env bash
# The GPU machine's checks in one command, cheapest and most informative first, so that a run cut
# short still leaves results:
#   scripts/gpu_check.sh            # on the GPU machine (device tool, carry [".gpu"]), at most ~10 min
#   scripts/gpu_check.sh --dry-run  # the same stages on the CPU at tiny sizes, writing the same files
# The GPU machine has no hydra-core, omegaconf or pytest: their wheels travel in .gpu/ (prepared once:
#   mkdir -p .gpu && cp -r ../shared/wheels ../shared/data .gpu/ && echo /.gpu/ >> .git/info/exclude).
# Everything lands under $OUT in the formats the repo commits, so committing the results is a copy:
#   stages.jsonl     one line per stage: its name, exit status and seconds (a stage past its share of
#                    the time budget is cut: rc 124)
#   env.txt          nvidia-smi (or the CPU), torch and Python versions
#   pytest.log       the CUDA tests (eager against captured and compiled steps, every estimator in a
#                    captured step), or on the CPU the captured step's logic through the stand-in
#   bench.jsonl      scripts/bench.py, every step mode beside the common loop (steps/s)
#   bench_packed.jsonl  packs of S runs against S separate runs (model-steps/s)
#   default_run.json metrics.json of a complete default run (50,000 steps, the m = 1000 test bound)
#   table1_gpu/      the packed full-protocol Table 1 (four halving sweeps, the chosen runs evaluated
#                    at m = 1000): jobs.json, results.md, figure.png, as docs/results/table1/
#   reinmax_gpu/     with the time left, the ReinMax benchmark's record (only finished jobs count)
# BUDGET (seconds, default 570) bounds the whole script; each stage gets at most what is left.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ $# -gt 0 ]; then
  echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gvae-gpu}
BUDGET=${BUDGET:-570}
WORK=$(mktemp -d /tmp/gvae-check.XXXXXX)  # sweeps, checkpoints, events: not brought back
mkdir -p "$OUT"
: > "$OUT/stages.jsonl"
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1

if [ $DRY = 1 ]; then
  DEVICE=cpu
  # Tiny sizes: every stage runs and writes its files in a few minutes on two cores.
  PYTEST_K="captured_step_trains_like and gumbel_softmax"
  BENCH="--steps 5 --warmup 2"; PACKED="1 2"; PACKED_STEPS="--steps 3 --warmup 1"
  SMALL=(data.num_train=500 data.num_val=200 eval.images=false)
  RUN=(train.max_steps=20 train.eval_every=10 train.ckpt_every=10 eval.num_samples=2 "${SMALL[@]}")
  # One learning rate of the grid's six: the halving still chooses among the schedules.
  TABLE=("hydra.sweeper.halving.rungs=[2,4]" 'hydra.sweeper.params={optim.lr: "3.0e-3"}' train.eval_every=2
         train.ckpt_every=2 "${SMALL[@]}")
  EVAL_M=2; REINMAX_M=2
  REINMAX=("hydra.sweeper.params.seed='0'" train.max_steps=4 train.eval_every=2 train.ckpt_every=2
           eval.num_samples=2 "${SMALL[@]}")
  # The packs in this process, as on the GPU (on a CPU the launcher's default is a worker per core).
  TABLE+=(hydra.launcher.workers=1); REINMAX+=(hydra.launcher.workers=1)
else
  DEVICE=cuda
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD GVAE_DATA_DIR=$PWD/.gpu/data
  PYTEST_K="cuda"  # the CPU stand-in's tests are the CPU's business
  BENCH="--steps 1000 --warmup 50"; PACKED="1 4 16 32 64 128"; PACKED_STEPS="--steps 300 --warmup 20"
  SMALL=(); RUN=(); TABLE=(); REINMAX=()
  EVAL_M=1000; REINMAX_M=100  # the ReinMax benchmark's own m (configs/experiment/reinmax_benchmark.yaml)
fi

# stage NAME SECONDS FN: run the function FN in a shell of its own with at most SECONDS (and what is
# left of the budget; on time out SIGINT, so a training run checkpoints), its output to
# $OUT/logs/NAME.log, and a line in stages.jsonl; the script goes on whatever it returns.
stage() {
  local name=$1 cap=$2 fn=$3
  local left=$((BUDGET - (SECONDS - START)))
  [ "$cap" -gt "$left" ] && cap=$left
  mkdir -p "$OUT/logs"
  if [ "$cap" -le 0 ]; then
    echo "{\"stage\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"no time left\"}" >> "$OUT/stages.jsonl"
    echo "== $name: skipped, no time left"; return
  fi
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$cap" bash -c "$DEFINITIONS; $fn" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"device\": \"$DEVICE\"}" >> "$OUT/stages.jsonl"
  echo "== $name: rc $rc in $((SECONDS - t0)) s"; tail -n 3 "$OUT/logs/$name.log"
}

environment() {
  if [ "$DRY" = 1 ]; then lscpu | head -n 20; else nvidia-smi; fi
  python3 -c "import sys, torch; cuda = torch.cuda.is_available(); print('python', sys.version.split()[0],
'torch', torch.__version__, torch.cuda.get_device_name() if cuda else 'cpu')"
}

tests() {
  python3 -m pytest -q -p no:cacheprovider tests/test_step.py tests/test_estimators.py -k "$PYTEST_K"
}

bench_modes() {
  # shellcheck disable=SC2086
  python3 scripts/bench.py --device $DEVICE $BENCH "${SMALL[@]}" | tee "$OUT/bench.jsonl"
}

bench_packed() {
  # shellcheck disable=SC2086
  python3 scripts/bench.py --device $DEVICE --packed $PACKED $PACKED_STEPS "${SMALL[@]}" \
    | tee "$OUT/bench_packed.jsonl"
}

default_run() {
  python3 -m gvae.train device=$DEVICE "hydra.run.dir=$WORK/default_run" "${RUN[@]}" \
    && cp "$WORK/default_run/metrics.json" "$OUT/default_run.json"
}

# Table 1's four sweeps in packs, each followed by its chosen runs' m = 1000 evaluation, so that a
# table cut short by the budget still has its finished rows evaluated; the record comes after.
table() {
  for sweep in vae_categorical vae_bernoulli sbn_categorical sbn_bernoulli; do
    local dir=$WORK/sweeps/table1_$sweep
    python3 -m gvae.train -m hydra/launcher=packed experiment=table1_${sweep%_*} model=${sweep#*_} \
      device=$DEVICE "hydra.sweep.dir=$dir" "${TABLE[@]}" || return
    python3 -m gvae.table chosen "$dir" | xargs -r python3 -m gvae.evaluation eval.num_samples=$EVAL_M \
      device=$DEVICE || return
  done
}

# The record of whatever has finished (a sweep's missing jobs are recorded as missing).
record() {
  local folder=$1 title=$2 m=$3; shift 3
  local sweeps=()
  for dir in "$@"; do [ -f "$dir/multirun.yaml" ] && sweeps+=("$dir"); done
  [ ${#sweeps[@]} -gt 0 ] || { echo "no sweep started"; return 1; }
  python3 -m gvae.table record "${sweeps[@]}" --out "$OUT/$folder" --title "$title" --num-samples "$m"
}

table_record() {
  record table1_gpu "Table 1 of Jang et al. (2017), every row, in packs on $DEVICE" $EVAL_M \
    "$WORK"/sweeps/table1_{vae,sbn}_{categorical,bernoulli}
}

reinmax() {
  local dir=$WORK/sweeps/reinmax_benchmark
  python3 -m gvae.train -m hydra/launcher=packed experiment=reinmax_benchmark device=$DEVICE \
    "hydra.sweep.dir=$dir" "${REINMAX[@]}" || return
  python3 -m gvae.table chosen "$dir" | xargs -r python3 -m gvae.evaluation eval.num_samples=$REINMAX_M \
    device=$DEVICE
}

reinmax_record() {
  record reinmax_gpu "The ReinMax benchmark, in packs on $DEVICE" "$REINMAX_M" "$WORK/sweeps/reinmax_benchmark"
}

DEFINITIONS="$(declare -p DRY DEVICE OUT WORK EVAL_M REINMAX_M PYTEST_K BENCH PACKED PACKED_STEPS SMALL RUN \
  TABLE REINMAX); $(declare -f environment tests bench_modes bench_packed default_run table record \
  table_record reinmax reinmax_record)"

stage env 30 environment
cp "$OUT/logs/env.log" "$OUT/env.txt"
stage tests 90 tests
cp "$OUT/logs/tests.log" "$OUT/pytest.log"
stage bench 90 bench_modes
stage bench_packed 100 bench_packed
stage default_run 60 default_run
BUDGET=$((BUDGET - 90)) stage table1 600 table  # leaves 90 s for its record (84 jobs) and the ReinMax one
stage table1_record 60 table_record
BUDGET=$((BUDGET - 30)) stage reinmax 600 reinmax
stage reinmax_record 30 reinmax_record
rm -rf "$WORK"
echo "== done in $((SECONDS - START)) s; results under $OUT"
