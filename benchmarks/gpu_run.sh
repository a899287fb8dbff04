#!/usr/bin/env bash
# The one command a session lent a GPU runs (see benchmarks/gpu_run.py): benchmarks/gpu_run.sh OUT [--smoke]
# Each step's failure is reported and the rest still run; the exit status says whether any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_run.py "$@"
