"""The README stays a user's page whose commands work and whose links resolve.

Each README command also runs in its tiny form in the test named beside it in COVERED_BY; here
every one is checked against the code: its config file loads, every `--config.*` key exists,
its flags are flags of the entry point it names."""

import importlib.util
import os
import pathlib
import re
import shlex

import pytest

from diffusion_jax import config_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
ELLIPSIS = 'python -m diffusion_jax.main --config=configs/mnist.py'
# Where each README command runs in its tiny form (a command under a minute there).
COVERED_BY = {
    'configs/mnist.py': 'test_train.py (the shared tiny run), test_main.py',
    'configs/mnist_score.py': 'test_score_cli.py',
    'configs/mnist_cfg.py': 'test_guidance_cli.py',
    'configs/mnist_classifier.py': 'test_guidance_cli.py',
    'configs/folder.py': 'test_folder.py',
    'configs/cifar10.py': 'test_aot.py',
}
MAIN_FLAGS = {'config', 'workdir', 'mode', 'cpu_devices', 'cpu_fast_math', 'distributed',
              'coordinator_address', 'num_processes', 'process_id'}


def readme_commands():
    """Every `python -m diffusion_jax...` command of the README (code blocks and table cells)."""
    text = README.replace('\\\n', ' ')
    found = re.findall(r'(?:`|^)((?:python -m diffusion_jax\.[a-z_.]+|\.\.\.) [^`\n]*)', text,
                       flags=re.M)
    return [c.replace('...', ELLIPSIS, 1) if c.startswith('...') else c for c in found]


def test_readme_is_short_and_opens_with_the_two_commands():
    assert len(README.split()) <= 1600
    blocks = re.findall(r'```bash\n(.*?)```', README, flags=re.S)
    assert blocks[0].strip().endswith(
        'python -m diffusion_jax.main --config=configs/mnist.py --workdir=runs/mnist')
    assert blocks[1].strip().endswith("-e '.[test,parity]' && pytest")
    assert README.index('## Two commands') < README.index('## The methods')


@pytest.mark.parametrize('command', readme_commands())
def test_readme_command_names_real_configs_keys_and_flags(command):
    argv = shlex.split(command.split('&&')[-1])
    module = argv[2]
    if module == 'diffusion_jax.allocator':  # Runs the command it is given: tests/test_main.py.
        assert len(argv) > 3 and importlib.util.find_spec(module), command
        return
    config_paths = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
    assert config_paths, command
    config_file = config_paths[0].split(':')[0]
    assert (ROOT / config_file).is_file(), command
    assert config_file in COVERED_BY or module != 'diffusion_jax.main', command
    config_cli.config_from_file(ROOT / config_paths[0])  # Loads (with its :argument).
    old = pathlib.Path.cwd()
    os.chdir(ROOT)  # The README's paths are relative to the repository.
    try:
        assert config_cli._unknown_override(argv) is None, command
    finally:
        os.chdir(old)
    if module == 'diffusion_jax.main':
        flags = {a[2:].split('=', 1)[0] for a in argv[3:]
                 if a.startswith('--') and not a.startswith('--config.')}
        assert flags <= MAIN_FLAGS, command


def markdown_files():
    return [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


def anchors(path):
    """GitHub's heading anchors of a markdown file."""
    result = set()
    for heading in re.findall(r'^#+ (.*)$', path.read_text(), flags=re.M):
        slug = re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
        result.add(slug)
    return result


@pytest.mark.parametrize('page', markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'[a-z]+://', target) or target.startswith('mailto:'):
            continue
        file_part, _, anchor = target.partition('#')
        resolved = (page.parent / file_part).resolve() if file_part else page
        assert resolved.exists(), f'{page.name}: {target} does not exist'
        if anchor and resolved.suffix == '.md':
            assert anchor in anchors(resolved), f'{page.name}: no heading #{anchor} in {file_part}'
