#!/usr/bin/env bash
# The GPU check of issue 13, in one call of at most ~8 minutes on any CUDA machine, from a bare checkout:
#   1. c2r's venv (.venv) with CUDA torch, via scripts/setup.sh; 2. SAELens's own venv (optional);
#   3. benchmarks/step_speed.py: c2r vs SAELens, TopK and BatchTopK, with and without C²R (interval=1),
#      d=2304, F=65536, k=80, B=2048, bf16 autocast, peak memory, and `python -m c2r.train` end to end;
#   4. benchmarks/c2r_overhead.py --device cuda --d 2304 --k 80 --sizes 65536;
#   5. a short `hardware=gpu` training run and a 1-GPU `hardware=ddp` run (synthetic data).
# Everything lands in benchmarks/results/gpu/<date>/ (one log per part, status.txt, the JSON results).
#
# Offline machines: point C2R_WHEELHOUSE at a folder of wheels (CUDA torch==2.13.0, c2r's dependencies and, for
# the comparison, sae-lens and its dependencies), made elsewhere with e.g.
#   pip download -d wheelhouse torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
#   pip download -d wheelhouse -e '.[dev]' sae-lens
# pip then installs from it only. A part that cannot be set up is skipped with its reason in status.txt, and
# the other parts still run. SAELENS_PYTHON: use an existing SAELens interpreter instead of building one.
#
#   bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="benchmarks/results/gpu/$(date +%Y-%m-%d_%H-%M-%S)"
mkdir -p "$OUT"
STATUS="$OUT/status.txt"
TORCH_VERSION=2.13.0
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
if [ -n "${C2R_WHEELHOUSE:-}" ]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$C2R_WHEELHOUSE"
fi
export WANDB_MODE=disabled

note() { echo "$*" | tee -a "$STATUS"; }

# part NAME SECONDS COMMAND...: run one part with a time limit, its output in $OUT/NAME.log; never stops the script
# (a shell function runs as `bash -c function`, exported).
part() {
    local name=$1 seconds=$2
    shift 2
    local started=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then note "ok      $name ($((SECONDS - started)) s)"; else note "FAILED  $name (exit $rc after $((SECONDS - started)) s, see $name.log)"; fi
    return $rc
}

has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; uname -a; } >"$OUT/machine.txt" 2>&1

# 1. c2r's venv with CUDA torch (the CPU wheel of an earlier setup is replaced).
setup_c2r() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if ! has_cuda_torch .venv/bin/python; then
        .venv/bin/pip uninstall -q -y torch 2>/dev/null  # a CPU build satisfies torch==X too: remove it first
        if [ -n "${C2R_WHEELHOUSE:-}" ]; then .venv/bin/pip install -q "torch==$TORCH_VERSION"
        else .venv/bin/pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"; fi
    fi
    bash scripts/setup.sh && has_cuda_torch .venv/bin/python
}
export TORCH_VERSION TORCH_INDEX
export -f has_cuda_torch setup_c2r
if ! part setup_c2r 240 bash -c setup_c2r; then
    note "c2r's venv has no CUDA torch (offline? set C2R_WHEELHOUSE): nothing else can run"
    exit 1
fi

# 2. SAELens in its own venv (never a dependency of c2r), with the same CUDA torch.
SAELENS_PYTHON=${SAELENS_PYTHON:-.venvs/saelens/bin/python}
setup_saelens() {
    [ -x "$SAELENS_PYTHON" ] && "$SAELENS_PYTHON" -c "import sae_lens" 2>/dev/null && return 0
    local venv
    venv=$(dirname "$(dirname "$SAELENS_PYTHON")")
    python3 -m venv "$venv" || return 1
    if [ -n "${C2R_WHEELHOUSE:-}" ]; then "$venv/bin/pip" install -q "torch==$TORCH_VERSION" || return 1
    else "$venv/bin/pip" install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX" || return 1; fi
    "$venv/bin/pip" install -q sae-lens && "$SAELENS_PYTHON" -c "import sae_lens"
}
export SAELENS_PYTHON
export -f setup_saelens
part setup_saelens 150 bash -c setup_saelens || note "SAELens unavailable (no internet and no C2R_WHEELHOUSE?): the step benchmark runs c2r alone"

SHAPES=(--device cuda --d 2304 --dict-size 65536 --k 80 --batch 2048 --bf16)
part step_speed 210 .venv/bin/python benchmarks/step_speed.py "${SHAPES[@]}" --end-to-end \
    --saelens "$SAELENS_PYTHON" --out "$OUT/step_speed_cuda.json"
part c2r_overhead 90 .venv/bin/python benchmarks/c2r_overhead.py --device cuda --d 2304 --k 80 --sizes 65536 \
    --out "$OUT/c2r_overhead_cuda.json"

TRAIN=(data=synthetic logger=csv evaluation=none data.d_in=2304 dict_size=65536 model.k=80 batch_size=2048
       train_tokens=61440 data.source.rows=98304 data.source.rows_per_shard=16384 trainer.val_check_interval=1000
       regularizer=c2r "cache_dir=$OUT/cache")
part train_gpu 120 .venv/bin/python -m c2r.train hardware=gpu "${TRAIN[@]}" "hydra.run.dir=$OUT/train_gpu"
part train_ddp 120 .venv/bin/python -m c2r.train hardware=ddp hardware.devices=1 "${TRAIN[@]}" "hydra.run.dir=$OUT/train_ddp"
# End-to-end tokens/s of the two training runs (their logged details/tokens_per_second, median).
for run in train_gpu train_ddp; do
    .venv/bin/python - "$OUT/$run" <<'PY' | tee -a "$STATUS"
import csv, pathlib, statistics, sys
rates = [float(row["details/tokens_per_second"]) for path in pathlib.Path(sys.argv[1]).rglob("metrics.csv")
         for row in csv.DictReader(path.open()) if row.get("details/tokens_per_second")]
print(f"{pathlib.Path(sys.argv[1]).name}: median {statistics.median(rates):,.0f} tokens/s" if rates else "no tokens/s logged")
PY
done
rm -rf "$OUT/cache" "$OUT"/train_*/checkpoints "$OUT"/train_*/sae  # GBs at F=65536; the logs and metrics stay
note "results in $OUT"
