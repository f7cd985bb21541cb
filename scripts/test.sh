#!/usr/bin/env bash
# Set up .venv (torch pinned to the CPU wheel through .ci/constraints.txt) and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, exactly as pinned: any other torch spec would pull a multi-GB CUDA build.
python -m pip install -q -c .ci/constraints.txt "torch==2.13.0"
python -m pip install -q -c .ci/constraints.txt -e ".[test]"
ruff check src tests benchmarks
# --dist loadfile: a module stays on one worker, so its module fixtures (reference runs of
# the peers, subprocesses) run once, not once per worker (691 s against 713 s with "load")
python -m pytest -n 2 --dist loadfile tests "$@"
