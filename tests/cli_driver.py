"""Many command lines of `python -m diffusion_jax.main` from one interpreter's imports.

    python tests/cli_driver.py CASES.json OUT_DIR

CASES.json: {"cases": {NAME: {"argv": [flags...], "num_devices": N, "env": {...}}},
"watch": DIR}. The driver imports the entry point once (about 4 s of the 6 s a command line
takes on 2 cores), then runs each case in a forked child, before any JAX backend exists,
through the same `config_cli.run(main.main)` as `python -m diffusion_jax.main`: flag parsing,
the one-line user errors and their exit status included. OUT_DIR/NAME.out gets the case's
stdout and stderr (both file descriptors); OUT_DIR/results.json, per case, the exit status and
the SHA-256 of every file under DIR after the case (did a failed command write anything?).
"""

import json
import os
import sys
import traceback

import jax

from conftest import file_digests
from diffusion_jax import config_cli
from diffusion_jax import main


def run_case(case, output_path):
    """In the child: the command line with its output to `output_path`; never returns."""
    status = 1
    try:
        with open(output_path, 'w') as output:
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
        os.environ.update(case.get('env', {}))
        # JAX read JAX_NUM_CPU_DEVICES when the parent imported it.
        jax.config.update('jax_num_cpu_devices', case.get('num_devices', 1))
        sys.argv = [main.__file__, *case['argv']]
        try:
            config_cli.run(main.main)
            status = 0
        except SystemExit as e:  # What the interpreter would make of it.
            status = e.code if isinstance(e.code, int) else (e.code is not None)
        except BaseException:  # An uncaught exception: the traceback and status 1.
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main_driver(cases_path, out_dir):
    with open(cases_path) as f:
        spec = json.load(f)
    if jax._src.xla_bridge.backends_are_initialized():
        raise RuntimeError('a JAX backend exists before the fork')
    results = {}
    for name, case in spec['cases'].items():
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_case(case, os.path.join(out_dir, f'{name}.out'))
        results[name] = {'status': os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]),
                         'files': file_digests(spec['watch'])}
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(results, f)


if __name__ == '__main__':
    main_driver(*sys.argv[1:])
