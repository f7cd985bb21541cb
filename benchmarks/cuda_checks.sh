#!/usr/bin/env bash
# Issue #16's device checks, in one run on a machine with an NVIDIA GPU (torch with CUDA,
# jax[cuda], optax, numba, safetensors installed; the repository need not be installed):
# the CUDA tests, then the optimizer-step and train-epoch benchmarks on the GPU. Logs go to
# $OUT (or ./cuda-logs). CI never runs this.
#
#     bash benchmarks/cuda_checks.sh [quick|short|dry]
#
# quick: the tests only; short: fewer cases; dry: every command of the full run on the CPU
# at small sizes and one round (~10 minutes on 2 cores), to check the script before a GPU
# session spends its device time on it (tests/test_benchmark_scripts.py, marked slow).
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-cuda-logs}; mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false MITHRIL_CACHE_DIR=${MITHRIL_CACHE_DIR:-/tmp/mithril-cache}
run() { echo "== $*"; "$@" 2>&1 | tee -a "$out/log.txt"; }
mode=${1:-}
# the full run's sizes; "dry" swaps in the CPU and small ones
dev=cuda sizes=10Mx10,100Mx10,a chained=100kx10,1Mx10,10Mx10 cases=10Mx10,a r=3 r5=5 r7=7
tensors=500 many="--tensors 2000 --total 2000000" clip=200000 wide="--hidden 1024 1024 --batch 1024"
opts=adam,sgd
[ "$mode" = short ] && sizes=10Mx10,a opts=adam
if [ "$mode" = dry ]; then
    dev=cpu sizes=100kx10 chained=100kx10 cases=100kx10 r=1 r5=1 r7=1 tensors=50 clip=20000
    many="--tensors 200 --total 20000" wide="--hidden 64 64 --batch 64"
else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
fi
date -u
python3 -c "import torch, jax, optax, numba; print('torch', torch.__version__, '| jax', jax.__version__, jax.default_backend(), '| optax', optax.__version__, '| numba', numba.__version__)"
run python3 -m pytest -p no:cacheprovider -q -rs tests/test_torch_fused_engine.py
[ "$mode" = quick ] && exit 0
run python3 benchmarks/optimizer_step.py --device $dev --shared --backends torch,jax \
    --sizes $sizes --optimizers $opts --rounds $r --block 20 --warm 0.05
# "propagate" with its report read a step late, against "unchecked" and the references, in
# chains of 20 steps with one wait (what a loop that reads nothing back between steps sees)
run python3 benchmarks/optimizer_step.py --device $dev --shared --backends torch,jax \
    --sizes $chained --optimizers adam --rounds $r --block 10 --warm 0.05 --chain 20
# the jitted engine's one chunk against runs of 16 and of 1 tensor (MITHRIL_JAX_CHUNK_TENSORS):
# one chunk was ~5x optax's time on 200 tensors (case a), 0.6x on 10
for k in 0 16 1; do
    echo "== MITHRIL_JAX_CHUNK_TENSORS=$k" | tee -a "$out/log.txt"
    MITHRIL_JAX_CHUNK_TENSORS=$k run python3 benchmarks/optimizer_step.py --device $dev \
        --shared --backends jax --sizes $cases --optimizers adam --unchecked --rounds $r \
        --block 20 --warm 0.05
done
# "propagate"'s norm and finite probe with and without their barriers (MITHRIL_JAX_BARRIERS):
# without them XLA's GPU compiler may fuse the probe into the update's loops (on the H200,
# 2026-11-30, "propagate" took 0.90 ms against "unchecked"'s 0.34 on 10M params in 10 tensors)
for b in 1 0; do
    echo "== MITHRIL_JAX_BARRIERS=$b" | tee -a "$out/log.txt"
    MITHRIL_JAX_BARRIERS=$b run python3 benchmarks/optimizer_step.py --device $dev --shared \
        --backends jax --sizes $cases --optimizers adam --unchecked --rounds $r --block 20 \
        --warm 0.05
done
# the jitted engine's repeated step with gradients whose keys are sorted (as jax.jit returns
# them) against the parameters' order: the recipe's host time on a device
run python3 benchmarks/gradient_order.py --device $dev --backends torch,jax --tensors $tensors \
    --rounds $r7
# the jitted engine's first step (compile) and steady step on many tensors, parameter
# groups, a two-pass optimizer and per-tensor clipping included, against optax (JAX's
# default device); then a small model, where a wait for the device per step shows most
run python3 benchmarks/jit_first_step.py --rounds $r5
run python3 benchmarks/jit_first_step.py --cases lamb,adam-tensor-clip --tensors 20 \
    --total $clip --rounds $r5 --block 20
# many small tensors in one chunk: on a GPU their slices keep constant offsets, a kernel
# each (jax_parts.slice_offsets: arguments on CPU only); is the first step's compile long?
run python3 benchmarks/jit_first_step.py --cases adam $many --rounds $r
run python3 benchmarks/train_epoch.py --device $dev --shared --backend torch jax --rounds $r5
[ "$mode" = short ] || run python3 benchmarks/train_epoch.py --device $dev --shared \
    --backend torch jax --rounds $r5 $wide
