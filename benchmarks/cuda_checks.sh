#!/usr/bin/env bash
# Issue #16's device checks, in one run on a machine with an NVIDIA GPU (torch with CUDA,
# jax[cuda], optax, numba, safetensors installed; the repository need not be installed):
# the CUDA tests, then the optimizer-step and train-epoch benchmarks on the GPU. Logs go to
# $OUT (or ./cuda-logs). CI never runs this.
#
#     bash benchmarks/cuda_checks.sh [quick|short]     (quick: the tests; short: fewer cases)
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-cuda-logs}; mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false MITHRIL_CACHE_DIR=${MITHRIL_CACHE_DIR:-/tmp/mithril-cache}
run() { echo "== $*"; "$@" 2>&1 | tee -a "$out/log.txt"; }
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, jax, optax, numba; print('torch', torch.__version__, torch.cuda.get_device_name(), '| jax', jax.__version__, jax.default_backend(), '| optax', optax.__version__, '| numba', numba.__version__)"
run python3 -m pytest -p no:cacheprovider -q -rs tests/test_torch_fused_engine.py
[ "${1:-}" = quick ] && exit 0
sizes=10Mx10,100Mx10,a opts=adam,sgd
[ "${1:-}" = short ] && sizes=10Mx10,a opts=adam
run python3 benchmarks/optimizer_step.py --device cuda --shared --backends torch,jax \
    --sizes $sizes --optimizers $opts --rounds 3 --block 20 --warm 0.05
# "propagate" with its report read a step late, against "unchecked" and the references, in
# chains of 20 steps with one wait (what a loop that reads nothing back between steps sees)
run python3 benchmarks/optimizer_step.py --device cuda --shared --backends torch,jax \
    --sizes 100kx10,1Mx10,10Mx10 --optimizers adam --rounds 3 --block 10 --warm 0.05 --chain 20
# the jitted engine's one chunk against runs of 16 and of 1 tensor (MITHRIL_JAX_CHUNK_TENSORS):
# one chunk was ~5x optax's time on 200 tensors (case a), 0.6x on 10
for k in 0 16 1; do
    echo "== MITHRIL_JAX_CHUNK_TENSORS=$k" | tee -a "$out/log.txt"
    MITHRIL_JAX_CHUNK_TENSORS=$k run python3 benchmarks/optimizer_step.py --device cuda \
        --shared --backends jax --sizes 10Mx10,a --optimizers adam --unchecked --rounds 3 \
        --block 20 --warm 0.05
done
# "propagate"'s norm and finite probe with and without their barriers (MITHRIL_JAX_BARRIERS):
# without them XLA's GPU compiler may fuse the probe into the update's loops (on the H200,
# 2026-11-30, "propagate" took 0.90 ms against "unchecked"'s 0.34 on 10M params in 10 tensors)
for b in 1 0; do
    echo "== MITHRIL_JAX_BARRIERS=$b" | tee -a "$out/log.txt"
    MITHRIL_JAX_BARRIERS=$b run python3 benchmarks/optimizer_step.py --device cuda --shared \
        --backends jax --sizes 10Mx10,a --optimizers adam --unchecked --rounds 3 --block 20 \
        --warm 0.05
done
# the jitted engine's repeated step with gradients whose keys are sorted (as jax.jit returns
# them) against the parameters' order: the recipe's host time on a device
run python3 benchmarks/gradient_order.py --device cuda --backends torch,jax --tensors 500 --rounds 7
# the jitted engine's first step (compile) and steady step on many tensors, parameter
# groups, a two-pass optimizer and per-tensor clipping included, against optax (JAX's
# default device); then a small model, where a wait for the device per step shows most
run python3 benchmarks/jit_first_step.py --rounds 5
run python3 benchmarks/jit_first_step.py --cases lamb,adam-tensor-clip --tensors 20 \
    --total 200000 --rounds 5 --block 20
# many small tensors in one chunk: on a GPU their slices keep constant offsets, a kernel
# each (jax_parts.slice_offsets: arguments on CPU only); is the first step's compile long?
run python3 benchmarks/jit_first_step.py --cases adam --tensors 2000 --total 2000000 --rounds 3
run python3 benchmarks/train_epoch.py --device cuda --shared --backend torch jax --rounds 5
[ "${1:-}" = short ] || run python3 benchmarks/train_epoch.py --device cuda --shared \
    --backend torch jax --rounds 5 --hidden 1024 1024 --batch 1024
