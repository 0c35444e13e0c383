#!/usr/bin/env bash
# bench/gpu.sh OUTDIR [--tiny] [more bench/gpu.py arguments]
#
# One shot on a bare GPU machine (issue 15): installs what it lacks from wheels in .whl/, runs tests/test_cuda.py,
# then bench/gpu.py (minisd vs diffusers on random full-size SD 1.5 weights: fp16/bf16 parity, the time and peak
# memory of a 512x512, 50-step, CFG 7.5 image, minisd's compiled modes). Writes OUTDIR/gpu.json (rewritten after
# every measurement), OUTDIR/gpu.log (everything printed) and OUTDIR/test_cuda.log. Budget: <= 8 minutes in all.
#
# HOW A SESSION WITH A GPU RUNS IT
# 1. The device tool sends the checkout the SESSION was started in (not a helper's worktree): that checkout must
#    hold this script (committed or not) and the wheels in its root's .whl/ (ignored by .gitignore; 6.3 MiB):
#      P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl"
#      python3 -m pip download $P diffusers==0.42.1 fastcore==1.14.5 fastprogress==1.0.5 importlib_metadata==8.7.0
#    (the machine has torch 2.11, transformers 5.17, huggingface_hub 1.33, safetensors 0.8, numpy, pillow, regex,
#    requests, filelock, zipp: diffusers 0.42.1 needs nothing else; minisd is imported from the tree, no install.)
# 2. One call of the device tool, nothing else on the machine before it:
#      run(command="bash bench/gpu.sh $OUT", carry=[".whl"], timeout_s=540)
#    The reply's output_tail ends with the summary table; the files come back from $OUT: gpu.json, gpu.log,
#    test_cuda.log. Then give_back, unless rerunning at once (e.g. `bash bench/gpu.sh $OUT --best compile` to
#    retry one stage: bench/gpu.py --help lists the flags).
# 3. Copy the figures into bench/RESULTS.md with date, device (the reply's device and gpu.json's meta) and command.
#
# Dry run on a CPU (here): bash bench/gpu.sh /tmp/gpu-dry --tiny   (the install step is skipped when the imports
# already work, e.g. in the project's venv; tests/test_cuda.py then only has to be collected and skipped).
set -uo pipefail
OUTDIR=${1:?usage: bash bench/gpu.sh OUTDIR [--tiny] [bench/gpu.py arguments]}
shift
mkdir -p "$OUTDIR" || exit 1
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
TOTAL=${GPU_SH_SECONDS:-470}   # the whole script; the device call's timeout_s (540) leaves a minute beyond it

{
  echo "bench/gpu.sh $(date -u '+%F %T') UTC, $(uname -n), args: $*"
  if $PY -c 'import diffusers, fastcore, fastprogress' 2>/dev/null; then
    echo "install: skipped (diffusers, fastcore and fastprogress already import)"
  else
    ls .whl/*.whl >/dev/null 2>&1 || { echo "install: no .whl/*.whl here and diffusers does not import: see this script's header"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=$PWD:/tmp/site
    echo "install: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')-> /tmp/site in ${SECONDS} s"
  fi
  $PY -c 'import torch, diffusers, transformers, minisd; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "", "| diffusers", diffusers.__version__,
"| transformers", transformers.__version__, "| minisd from", minisd.__file__)' || exit 3
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader

  echo "== tests/test_cuda.py"
  timeout -k 10 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUTDIR/test_cuda.log" | tail -15
  echo "tests/test_cuda.py exit ${PIPESTATUS[0]} after ${SECONDS} s"

  BUDGET=$((TOTAL - SECONDS - 25))
  echo "== bench/gpu.py, budget ${BUDGET} s"
  timeout -k 15 $((BUDGET + 20)) $PY bench/gpu.py "$OUTDIR" --budget "$BUDGET" "$@"
  echo "bench/gpu.py exit $? after ${SECONDS} s in all"
} 2>&1 | tee "$OUTDIR/gpu.log"
