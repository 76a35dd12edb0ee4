#!/usr/bin/env bash
# The GPU check on a lent GPU machine (its own JAX with CUDA, PyTorch, flax, optax, orbax; no
# network): install this checkout beside that JAX, then run benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh --out=gpu_check.json [--small]
#
# The package goes in with --no-deps, so the machine's JAX stays; the few requirements it lacks
# come from wheelhouse/ when that folder travels with the checkout (make it here with
# `pip download -d wheelhouse --only-binary=:all: --python-version=3.12 PACKAGE...`), else from
# the package index. Everything after the install is benchmarks/gpu_check.py's.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# Not `import diffusion_jax`: from the checkout's root that works uninstalled.
"$python" -m pip show diffusion_jax >/dev/null 2>&1 || "$python" -m pip install -q --no-deps -e .
# What setup.cfg asks for and the machine lacks (pip check also reports the machine's newer JAX,
# which stays), plus what the unit tier and the peer need beyond it.
missing=$("$python" -m pip check 2>/dev/null \
    | sed -n 's/^diffusion[-_]jax .* requires \([^,]*\), which is not installed\.$/\1/p' || true)
for module in pytest xdist filelock diffusers; do
    "$python" -c "import $module" 2>/dev/null || missing+=" ${module/xdist/pytest-xdist}"
done
if [[ -n $missing ]]; then
    # shellcheck disable=SC2086  # one word per package
    if [[ -d wheelhouse ]]; then
        "$python" -m pip install -q --no-index --find-links=wheelhouse $missing
    else
        "$python" -m pip install -q $missing
    fi
fi
exec "$python" -m benchmarks.gpu_check "$@"
