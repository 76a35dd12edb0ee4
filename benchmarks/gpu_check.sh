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
if ! "$python" -c 'import diffusion_jax' 2>/dev/null; then
    "$python" -m pip install -q --no-deps -e .
    missing=$("$python" - <<'PY'
import importlib.util
modules = {'ml_collections': 'ml-collections', 'tensorflow_datasets': 'tensorflow-datasets',
           'array_record': 'array_record', 'diffrax': 'diffrax', 'equinox': 'equinox',
           'chex': 'chex', 'absl': 'absl-py', 'tqdm': 'tqdm', 'tensorboardX': 'tensorboardX',
           'matplotlib': 'matplotlib', 'safetensors': 'safetensors', 'mlxtend': 'mlxtend',
           'sklearn': 'scikit-learn', 'importlib_resources': 'importlib_resources',
           'diffusers': 'diffusers', 'pytest': 'pytest', 'filelock': 'filelock',
           'xdist': 'pytest-xdist'}
print(' '.join(p for m, p in modules.items() if importlib.util.find_spec(m) is None))
PY
)
    if [[ -n $missing ]]; then
        # shellcheck disable=SC2086  # one word per package
        if [[ -d wheelhouse ]]; then
            "$python" -m pip install -q --no-index --find-links=wheelhouse $missing
        else
            "$python" -m pip install -q $missing
        fi
    fi
fi
exec "$python" -m benchmarks.gpu_check "$@"
