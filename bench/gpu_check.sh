#!/usr/bin/env bash
# One GPU session's checks in <= 8 minutes on one H100/H200: see bench/gpu_check.py.
#
#   bash bench/gpu_check.sh                        # on the GPU machine: writes $OUT/gpu_check.{json,md}
#                                                  # (else bench/results/gpu/), one log per section
#   bash bench/gpu_check.sh --device cpu --smoke   # the same sections on the CPU, < 3 minutes
#   bash bench/gpu_check.sh --fetch-wheels         # beforehand, on a machine with pip and a network:
#                                                  # the packages a bare GPU image lacks, into .whl/
#
# A GPU image that has torch but not this project's other dependencies (DeepSpeed, OmegaConf,
# pydantic, webdataset, pyts, submitit) gets them from the wheels in $GPU_CHECK_WHEELS (default
# .whl/), installed into /tmp/site for this run only, when `import deepspeed` fails.
#
# With this workplace's device tool: here `bash bench/gpu_check.sh --fetch-wheels` (.whl/ is
# git-ignored, so the call must carry it), then one call
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
# The sections' limits add up to 470 s; the wheels install in about 20 s before them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS="${GPU_CHECK_WHEELS:-.whl}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # Versions as in this project's environment; the GPU image runs CPython 3.12 on x86-64.
  mkdir -p "$WHEELS"
  if [[ "$WHEELS" == ".whl" ]] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
    echo /.whl/ >>.git/info/exclude
  fi
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    omegaconf==2.4.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0 webdataset==1.0.2 \
    braceexpand==0.1.7 pyts==0.14.1 submitit==1.5.4 || exit
  # DeepSpeed ships a source archive only; its wheel is pure Python (ops build at run time).
  "$PY" -m pip wheel --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8 || exit
  ls -l "$WHEELS"
  exit 0
fi

if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl || exit
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: DeepSpeed is not importable with $PY and no wheels are in $WHEELS;" \
      "run 'bash bench/gpu_check.sh --fetch-wheels' where pip can download" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project itself, not installed there
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
