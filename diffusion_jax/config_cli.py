"""What every command-line entry point shares: the --config/--workdir flags and their parsing.

`--config` is an ml_collections config file with `--config.a.b=value` overrides. User errors (an
unknown key or a value of the wrong type, and every `errors.UserError` the program raises) end it
with one `error: ...` line and exit status 2, not a traceback; bugs keep theirs.
"""

import functools
import importlib.util
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from diffusion_jax import allocator
from diffusion_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, event files and samples go here.')


def run(main, required=('config', 'workdir')):
    """`app.run(main)` with the config helpers: call it under `if __name__ == '__main__'`.

    First the process restarts itself once under the malloc of `allocator` (the dynamic loader
    and glibc read those settings only at start-up), so every command-line entry point runs
    with it.
    """
    allocator.reexec_with_allocator()
    flags.mark_flags_as_required(list(required))
    _make_configs_importable(sys.argv)
    app.run(functools.partial(_run_reporting_user_errors, main), flags_parser=parse_flags)


TRACEBACK_VARIABLE = 'DIFFUSION_JAX_TRACEBACK'


def fail(message, *, at_once=False):
    """Ends the program as a user error: one `error: ...` line on stderr, exit status 2.

    `at_once`: `os._exit`, skipping the interpreter's shutdown (see the full-disk case below).
    """
    print('error: ' + ' '.join(str(message).split()), file=sys.stderr, flush=True)
    if at_once:
        sys.stdout.flush()
        os._exit(2)
    raise SystemExit(2)


def _run_reporting_user_errors(main, argv):
    """`main(argv)`; a `UserError` ends it with one line (DIFFUSION_JAX_TRACEBACK=1: raised)."""
    try:
        return main(argv)
    except errors.UserError as e:
        if os.environ.get(TRACEBACK_VARIABLE, '') not in ('', '0'):
            raise
        # After a full disk, orbax's background writers of the failed save are still running:
        # at a normal interpreter shutdown each would print a traceback ("Event loop is closed").
        fail(e, at_once=isinstance(e, errors.DiskFullError))


def setup_logging():
    """INFO logging through absl, without orbax's line per file written; logs the allocator."""
    logging.set_verbosity(logging.INFO)
    py_logging.getLogger('absl').setLevel(py_logging.INFO)
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname)
    logging.info('Allocator: %s', allocator.describe())


def _config_path(argv):
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            return arg.split('=', 1)[1]
        if arg == '--config' and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_override(argv):
    """The first `--config.a.b=v` whose key the config file does not define, or None."""
    path = _config_path(argv)
    if path is None:
        return None
    config = config_from_file(path)
    for override in argv:
        if not override.startswith('--config.'):
            continue
        key = override[len('--config.'):].split('=', 1)[0]
        node = config
        for i, part in enumerate(key.split('.')):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = '.'.join(key.split('.')[:i]) or 'config'
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return f'unknown config key {key!r} in {override}; {parent} has: {valid}'
            node = node[part]
    return None


def parse_flags(argv):
    """absl flag parsing, with a clear message (not a traceback) for an unknown config key."""
    try:
        return FLAGS(argv)
    except flags.Error as e:  # e.g. a value of the wrong type for its key
        fail(f'{e} (see --helpfull)')
    except (AttributeError, KeyError):
        message = _unknown_override(argv)
        if message is None:
            raise
        fail(message)


def config_from_file(path):
    """The config of a config file, `--config` style: `configs/mnist_score.py:vp` calls
    `get_config('vp')`. For notebooks and scripts; the file's folder becomes importable."""
    file_path, _, arg = str(path).partition(':')
    _make_importable(file_path)
    spec = importlib.util.spec_from_file_location('_config_file', file_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _make_configs_importable(argv):
    path = _config_path(argv)
    if path:
        _make_importable(path.split(':', 1)[0])


def _make_importable(config_file):
    """Config files import their parent (`from configs import default`): put the folder that
    holds `configs/` on sys.path, so the command works from any working directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(config_file)))
    if root not in sys.path:
        sys.path.insert(0, root)
