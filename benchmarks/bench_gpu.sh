#!/usr/bin/env bash
# One command for a lent GPU: ours against transformers (bf16, SDPA, torch.compile, static
# cache), prefill and decode at batch 1 / 8 / 32 on a random full-size PaliGemma 1 3B-224,
# in under 5 minutes; the figures go to the JSON file (default bench_gpu.json; an existing one is
# replaced only with --force, and only if a benchmark wrote it). Arguments are
# bench_gpu.py's (`--help`); --device cpu --tiny is the dry run the tests make.
#
#   benchmarks/bench_gpu.sh --json "$OUT/bench_gpu.json"
#
# Python: $PYTHON, else the repository's .venv, else python3 (needs torch with CUDA and
# transformers). A run cut short by the time limit ($BENCH_GPU_TIMEOUT s, default 290) keeps
# the configurations already measured in the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec timeout "${BENCH_GPU_TIMEOUT:-290}" "$PYTHON" benchmarks/bench_gpu.py "$@"
