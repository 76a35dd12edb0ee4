"""Guidance and SDEdit from the CLI on the tiny config: a class-conditional U-Net sampled with
classifier-free guidance, a noise-aware classifier trained, evaluated and used to guide DDIM, and
--mode=edit (the stroke demo, a PNG guide with a mask, t0 = 0)."""

import json

import numpy as np
import pytest

from conftest import run_python
from diffusion_jax import images
from diffusion_jax.data import load_split


def tiny_command(workdir, data_dir, *overrides):
    return ['-m', 'diffusion_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
            f'--config.data.data_dir={data_dir}', '--config.sampling.num_samples=8',
            '--config.sampling.batch_size=8', *overrides]


CONDITIONAL = ('--config.model.num_classes=10', '--config.sampling.guidance=classifier_free',
               '--config.sampling.guidance_scale=2')
CLASSIFIER = ('--config.task=noisy_classifier', '--config.model.num_classes=10')


@pytest.fixture(scope='module')
def conditional_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp('cfg')
    run_python(tiny_command(workdir, data_dir, *CONDITIONAL), fast_compiles=True)
    return workdir


def test_classifier_free_guidance_trains_and_samples_the_requested_labels(conditional_run):
    with np.load(conditional_run / 'samples.npz') as f:
        samples, labels = f['images'], f['labels']
    assert samples.shape == (8, 8, 8, 1) and samples.std() > 0
    np.testing.assert_array_equal(labels, np.arange(8) % 10)  # sampling.labels = cycle
    saved = json.loads((conditional_run / 'config.json').read_text())
    assert saved['model']['num_classes'] == 10 and saved['training']['label_dropout'] == 0.1


def test_conditional_run_evaluates_its_unconditional_branch(conditional_run, data_dir):
    run_python(tiny_command(conditional_run, data_dir, *CONDITIONAL, '--mode=eval',
                            '--config.eval.num_images=8', '--config.eval.batch_size=8'),
               fast_compiles=True)
    results = json.loads((conditional_run / 'eval.json').read_text())
    assert results['num_images'] == 8 and 0 < results['bits_per_dim'] < 1000
    assert (conditional_run / 'interpolation.png').is_file()


def test_noisy_classifier_trains_evaluates_and_guides_ddim(tmp_path, data_dir, conditional_run):
    classifier_dir = tmp_path / 'classifier'
    run_python(tiny_command(classifier_dir, data_dir, *CLASSIFIER), fast_compiles=True)
    assert not (classifier_dir / 'samples.npz').exists()
    metrics = [json.loads(line) for line in (classifier_dir / 'metrics.jsonl').read_text()
               .splitlines()]
    assert 0 <= metrics[-1]['accuracy'] <= 1
    run_python(tiny_command(classifier_dir, data_dir, *CLASSIFIER, '--mode=eval',
                            '--config.eval.num_images=32'), fast_compiles=True)
    accuracy = json.loads((classifier_dir / 'eval.json').read_text())['accuracy_by_t']
    assert list(accuracy) == ['0', '5', '10', '14', '19'] and all(
        0 <= a <= 1 for a in accuracy.values())
    guided = tiny_command(conditional_run, data_dir, '--config.model.num_classes=10',
                          '--mode=sample', '--config.sampling.guidance=classifier',
                          '--config.sampling.guidance_scale=3', '--config.sampling.labels=7',
                          f'--config.sampling.classifier_workdir={classifier_dir}',
                          '--config.sampling.sampler=ddim', '--config.sampling.num_steps=5')
    run_python(guided, fast_compiles=True)
    with np.load(conditional_run / 'samples.npz') as f:
        assert f['images'].shape == (8, 8, 8, 1) and np.all(f['labels'] == 7)
    # A classifier of another forward process is refused by name.
    result = run_python(guided + ['--config.diffusion.beta_end=0.05'], check=False)
    assert result.returncode != 0
    assert 'trained on another forward process: diffusion.beta_end differ' in result.stderr


def test_edit_mode_stroke_demo_png_guide_with_mask_and_t0_zero(tmp_path, data_dir,
                                                               conditional_run):
    edit = tiny_command(conditional_run, data_dir, *CONDITIONAL, '--mode=edit',
                        '--config.edit.num_images=4', '--config.edit.stroke_block=2')
    run_python(edit + ['--config.edit.t0=0.5', '--config.edit.repeats=2'], fast_compiles=True)
    with np.load(conditional_run / 'edits.npz') as f:
        guides, edits, originals, labels = f['guides'], f['edits'], f['originals'], f['labels']
    assert edits.shape == (2, 4, 8, 8, 1) and originals.shape == (4, 8, 8, 1)
    # A conditional model is guided toward the digit each stroke was drawn from.
    test_images, test_labels = load_split('digits', 'test', data_dir=data_dir)
    np.testing.assert_array_equal(originals, test_images[:4])
    np.testing.assert_array_equal(labels, test_labels[:4])
    assert set(np.unique(guides).tolist()) <= {0, 255}  # Blocky strokes: ink or paper.
    assert (conditional_run / 'edits.png').is_file()

    rng = np.random.default_rng(0)
    guide = rng.integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    mask = np.zeros((1, 8, 8, 1), np.uint8)
    mask[:, :4] = 255  # Keep the top half.
    images.save_png(tmp_path / 'guide.png', images.make_grid(guide, ncol=3))
    images.save_png(tmp_path / 'mask.png', mask[0])
    run_python(edit + [f'--config.edit.guide={tmp_path / "guide.png"}',
                       f'--config.edit.mask={tmp_path / "mask.png"}', '--config.edit.t0=0.6'],
               fast_compiles=True)
    with np.load(conditional_run / 'edits.npz') as f:
        np.testing.assert_array_equal(f['guides'], guide)
        edited = f['edits'][0]
    np.testing.assert_array_equal(edited[:, :4], guide[:, :4])
    assert np.abs(edited[:, 4:].astype(int) - guide[:, 4:]).max() > 0
    run_python(edit + [f'--config.edit.guide={tmp_path / "guide.png"}', '--config.edit.t0=0'],
               fast_compiles=True)
    with np.load(conditional_run / 'edits.npz') as f:
        np.testing.assert_array_equal(f['edits'][0], guide)


def test_guidance_settings_fail_with_a_clear_message(tmp_path, data_dir):
    result = run_python(tiny_command(tmp_path / 'a', data_dir,
                                     '--config.sampling.guidance=classifier'), check=False)
    assert result.returncode != 0
    assert 'sampling.guidance=classifier needs sampling.classifier_workdir' in result.stderr
    result = run_python(tiny_command(tmp_path / 'b', data_dir,
                                     '--config.sampling.guidance=classifier_free'), check=False)
    assert result.returncode != 0
    assert 'classifier-free guidance needs a class-conditional U-Net' in result.stderr


def test_guidance_study_script_runs_small(tmp_path, data_dir):
    """scripts/guidance_study.py end to end on MNIST-5k with a few steps of everything: both
    trainings, both sweeps, SDEdit, the report and figures."""
    workdir, docs = tmp_path / 'study', tmp_path / 'docs'
    docs.mkdir()
    run_python(['scripts/guidance_study.py', '--config=configs/mnist_cfg.py',
                f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
                '--config.training.num_train_steps=10', '--config.training.batch_size=8',
                # One resolution level: a U-Net (and classifier) of few ops compiles fast, and
                # the study's code paths do not depend on the depth.
                '--config.model.ch_mult=(1,)', '--config.model.attn_resolutions=()',
                '--classifier_config.model.ch_mult=(1,)',
                '--classifier_config.model.attn_resolutions=()',
                '--config.training.log_every=5', '--config.sampling.batch_size=10',
                '--classifier_config.training.num_train_steps=10',
                '--classifier_config.training.batch_size=8',
                '--classifier_config.eval.num_images=20',
                '--num_samples=20', '--edit_images=10',
                '--ddim_steps=2', '--t0s=0.05', '--cfg_scales=0,1', '--classifier_scales=0,2',
                f'--docs_dir={docs}'], num_devices=2, fast_compiles=True, timeout=1500)
    report = json.loads((docs / 'guidance_study.json').read_text())
    assert [r['scale'] for r in report['classifier_free']] == [0.0, 1.0]
    assert [r['scale'] for r in report['classifier']] == [0.0, 2.0]
    assert [r['t0'] for r in report['sdedit']] == [0.0, 0.05]
    assert report['sdedit'][0]['l2_to_guide'] == 0.0 < report['sdedit'][1]['l2_to_guide']
    assert all(0 <= r['accuracy'] <= 1 for r in report['classifier_free'] + report['classifier'])
    assert set(report['noisy_classifier']['accuracy_by_t']) == {'0', '250', '500', '749', '999'}
    assert '| w | accuracy |' in (docs / 'guidance_study.md').read_text()
    for name in ('guidance_study.png', 'guidance_cfg_samples.png',
                 'guidance_classifier_samples.png', 'sdedit_strokes.png'):
        assert (docs / name).stat().st_size > 1000


def test_classifier_with_other_class_count_is_refused(tmp_path):
    from configs import tiny
    from diffusion_jax import checkpointing, parallel, train
    classifier_config = tiny.get_config()
    classifier_config.task, classifier_config.model.num_classes = 'noisy_classifier', 5
    checkpointing.save_config(str(tmp_path), classifier_config)  # Refused before any restore.
    config = tiny.get_config()
    config.model.num_classes = 10
    config.sampling.guidance, config.sampling.classifier_workdir = 'classifier', str(tmp_path)
    process = train.make_diffusion(config.diffusion)
    with pytest.raises(ValueError, match='classifier has 5 classes but the class-conditional '
                                         'model 10'):
        train.make_sampler(config, train.make_model(config), process, parallel.make_mesh())
