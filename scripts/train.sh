#!/usr/bin/env bash
# Set up .venv with the CLI extras and run the main job: train an MLP on scikit-learn's
# digits with the NumPy backend, writing metrics and plots under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[cli]"
mithril train "$@"
