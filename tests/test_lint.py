"""flake8, configured in setup.cfg, over the package, configs and tests."""

import subprocess
import sys

from conftest import ROOT


def test_flake8_clean():
    result = subprocess.run([sys.executable, '-m', 'flake8', 'diffusion_jax', 'configs', 'tests',
                             'benchmarks', 'scripts'],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
