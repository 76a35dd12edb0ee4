"""The GPU check: on a machine with a GPU, one run of what a GPU user would try first.

    bash benchmarks/gpu_check.sh --out=gpu_check.json            # on the GPU machine
    python -m benchmarks.gpu_check --small --out=/tmp/check.json  # here, on the CPU (tested)

Each part runs as its own process and is recorded whatever the others did:
  environment   Python, JAX and its devices, torch and its CUDA, diffusers;
  unit_tier     `pytest -m unit` (small: one module), passed / failed and the time;
  main_job      the README's main command (configs/mnist.py), its wall time and FD-MNIST5k /
                classifier IS of its 256 samples (small: a few steps and samples, T = 20,
                compiled without XLA's optimizations: it checks the plumbing, in seconds);
  benchmarks    our CIFAR-10 train step and sampler against diffusers on the same device, fp32
                and the bf16 policy, the peer eager and under torch.compile (small: the tiny
                smoke cases, torch.compile's graph capture without code generation).
The JSON holds every part's command, seconds, return code and results (or its error's tail).
"""

import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_CASES = ('train_cifar10_b128,train_cifar10_b128_bf16,'
             'sample_cifar10_128x100,sample_cifar10_128x100_bf16')
SMALL_CASES = 'train_tiny_b16,sample_tiny_16x20'
SMALL_MAIN_JOB = ('--config.training.num_train_steps=4', '--config.training.batch_size=8',
                  '--config.sampling.num_samples=16', '--config.sampling.batch_size=16',
                  '--config.diffusion.num_timesteps=20', '--config.sampling.chunk_size=10',
                  '--config.eval.batch_size=8', '--config.training.checkpoint_every=4')
ENVIRONMENT = r'''
import importlib.metadata, json, platform
import jax
info = {'python': platform.python_version(), 'jax': jax.__version__,
        'jax_backend': jax.default_backend(), 'jax_devices': [str(d) for d in jax.devices()]}
for package in ('jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'torch', 'diffusers'):
    try:
        info[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        info[package] = None
try:
    import torch
    info['torch_cuda'] = torch.cuda.is_available()
    info['torch_device'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'
except ImportError:
    pass
print(json.dumps(info))
'''
SAMPLE_METRICS = r'''
import json, sys
import numpy as np
from diffusion_jax.evaluation import feature_metrics
images = np.load(sys.argv[1])['images']
metrics = feature_metrics.mnist5k_metrics(images, kid_num_subsets=10)
print(json.dumps({k: (v.tolist() if hasattr(v, 'tolist') else v) for k, v in metrics.items()}))
'''


def run_part(argv, timeout, env=None):
    """A part's process: its command, seconds, return code, and stdout/stderr tails."""
    start = time.perf_counter()
    try:
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                env=env)
        code, out, err = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = 'timeout', e.stdout or '', e.stderr or ''
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    return {'command': ' '.join(argv), 'seconds': round(time.perf_counter() - start, 1),
            'returncode': code, 'stdout_tail': out[-2000:], 'stderr_tail': err[-2000:]}, out


def last_json(text):
    lines = [line for line in text.splitlines() if line.startswith('{')]
    return json.loads(lines[-1]) if lines else None


def environment():
    part, out = run_part([sys.executable, '-c', ENVIRONMENT], timeout=300)
    part['info'] = last_json(out)
    return part


def unit_tier(small):
    tests = ['tests/test_images.py'] if small else []
    part, out = run_part([sys.executable, '-m', 'pytest', '-m', 'unit', '-q', '-p',
                          'no:cacheprovider', *tests], timeout=1800)
    counts = dict((kind, int(n)) for n, kind in
                  re.findall(r'(\d+) (passed|failed|errors?|skipped|deselected)', out))
    part['counts'] = counts
    return part


def main_job(small, workdir):
    argv = [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/mnist.py',
            f'--workdir={workdir}', *(SMALL_MAIN_JOB if small else ())]
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='true') if small else None
    part, _ = run_part(argv, timeout=3600, env=env)
    samples = pathlib.Path(workdir) / 'samples.npz'
    if part['returncode'] == 0 and samples.exists():
        metrics, out = run_part([sys.executable, '-c', SAMPLE_METRICS, str(samples)],
                                timeout=600)
        part['sample_metrics'] = last_json(out)
        part['metrics_seconds'] = metrics['seconds']
    return part


def benchmarks(small, scratch):
    parts = {}
    for compile_backend in (('eager',) if small else ('none', 'inductor')):
        out_json = pathlib.Path(scratch) / f'benchmarks_{compile_backend}.json'
        argv = [sys.executable, '-m', 'benchmarks.run', '--force',
                f'--cases={SMALL_CASES if small else GPU_CASES}', f'--json={out_json}',
                f'--peer_compile={compile_backend}', *(('--quick',) if small else ())]
        part, _ = run_part(argv, timeout=3600)
        if out_json.exists():
            part['results'] = json.loads(out_json.read_text())
        parts[f'peer_compile_{compile_backend}'] = part
    return parts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='the JSON to write')
    parser.add_argument('--small', action='store_true',
                        help='minutes on a CPU: one test module, a few steps, the smoke cases')
    args = parser.parse_args()
    report = {'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
              'host': platform.node(), 'small': args.small}
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as scratch:
        parts = (('environment', environment),
                 ('unit_tier', lambda: unit_tier(args.small)),
                 ('main_job', lambda: main_job(args.small, os.path.join(scratch, 'mnist'))),
                 ('benchmarks', lambda: benchmarks(args.small, scratch)))
        for name, part in parts:
            print(f'{name} ...', flush=True)
            report[name] = part()
            pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + '\n')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
