"""scripts/main_job_study.py: its variants are valid overrides of the main job's config, the
proxy budget scales them as documented, and the report's timings and table come from the run's
own records. (The study itself is the main command run per variant; test_train runs that.)"""

import ast
import importlib.util
import json

import pytest

from conftest import ROOT
from configs import mnist


@pytest.fixture(scope='module')
def study():
    spec = importlib.util.spec_from_file_location('main_job_study',
                                                  ROOT / 'scripts' / 'main_job_study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # Defines no flags: those are made under __main__.
    return module


def _lookup(config, dotted):
    node = config
    for part in dotted.split('.'):
        node = node[part]
    return node


def test_every_override_is_a_key_of_the_main_config_with_a_value_of_its_type(study):
    config = mnist.get_config()
    base = config.training.num_train_steps
    for name in study.VARIANTS:
        # As the study runs them (a decay 'num_train_steps' becomes the run's step count).
        overrides = {k: v for k, v in study.variant_overrides(name, base).items()
                     if k in study.VARIANTS[name]}
        for key, text in overrides.items():
            current = _lookup(config, key)  # KeyError names a misspelt key.
            parsed = (ast.literal_eval(text) if isinstance(current, tuple)
                      else type(current)(text))
            assert type(parsed) is type(current), (name, key, text)
            assert parsed != current, f'{name}: {key}={text} is the default already'
    assert set(study.SAMPLE_ONLY) <= set(study.VARIANTS)
    assert set(study.SAMPLE_ONLY.values()) <= set(study.VARIANTS)


def test_proxy_budget_scales_steps_and_swaps_the_sampler(study):
    base = mnist.get_config().training.num_train_steps
    assert study.variant_overrides('baseline', base) == {
        'training.num_train_steps': str(base)}
    proxy = study.variant_overrides('batch_64_half_steps', base, train_fraction=0.5,
                                    sampler_steps=100,
                                    extra=study.parse_extra(['data.data_dir=/d']))
    assert proxy['training.num_train_steps'] == str(round(
        int(study.VARIANTS['batch_64_half_steps']['training.num_train_steps']) * 0.5))
    assert proxy['training.batch_size'] == '64' and proxy['data.data_dir'] == '/d'
    assert (proxy['sampling.sampler'], proxy['sampling.eta'], proxy['sampling.num_steps']) == (
        'ddim', '1.0', '100')
    # The cosine decay ends where the scaled run ends.
    cosine = study.variant_overrides('cosine_lr', base, train_fraction=0.5)
    assert cosine['optim.lr_decay_steps'] == cosine['training.num_train_steps'] == str(base // 2)
    # DDIM's noise ignores var_type: the sampling-only variants keep the ancestral sampler.
    assert 'sampling.sampler' not in study.variant_overrides('fixedsmall', base, sampler_steps=100)


def test_training_seconds_and_the_report(study, tmp_path):
    rows = [dict(step=1, loss=1.0, steps_per_sec=2.0), dict(step=1, samples=1),
            dict(step=51, loss=0.5, steps_per_sec=5.0), dict(step=101, steps_per_sec=10.0)]
    (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert study.training_seconds(str(tmp_path)) == (pytest.approx(0.5 + 10 + 5), 101)
    assert study._logged_seconds(r'Compiled the train step in ([\d.]+) s',
                                 'x\nCompiled the train step in 19.5 s\n') == 19.5
    row = dict(variant='lr_2e-3', overrides={'optim.learning_rate': '2e-3'}, wall_seconds=1200,
               compile_seconds=19.5, train_seconds=640.0, train_steps=2400, steps_per_sec=3.75,
               sample_seconds=500.0, fd_mnist5k=38.25, classifier_is=8.123,
               class_counts=[30, 20, 25, 26, 27, 24, 23, 28, 27, 26])
    reuse = dict(row, variant='fixedsmall', overrides={}, reuses='baseline',
                 train_seconds=None, compile_seconds=None, bits_per_dim=2.1234)
    floor = dict(num_samples=256, subsets=8, fd_mnist5k=19.2, fd_mnist5k_std=2.2,
                 classifier_is=8.05, classifier_is_std=0.21)
    study.write_report(dict(command='python s.py', budget='the real one', rows=[row, reuse],
                            real_digits=floor), str(tmp_path))
    table = (tmp_path / 'main_job_study.md').read_text()
    assert ('| lr_2e-3 | optim.learning_rate=2e-3 | 20.0 | 19.5 | 640 | 2400 | 3.75 | 500 | '
            '38.2 | 8.12 | 20 | n/a |') in table
    assert ('| fixedsmall | (none) (sampling only; weights of baseline) | 20.0 | n/a | n/a |'
            in table)
    assert table.count('| 2.123 |') == 1  # Only the row that has bits/dim.
    assert 'FD-MNIST5k 19.2 ± 2.2, classifier IS 8.05 ± 0.21' in table
    assert json.loads((tmp_path / 'main_job_study.json').read_text())['rows'][1]['reuses'] == (
        'baseline')
