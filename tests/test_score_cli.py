"""Score-based models from the CLI: a VP SDE and an NCSN on the tiny image config (train, sample
with each of their samplers, eval), and the 2-D toy config's trained MLP against the ground truth
with looser bounds than the exact score gets (tests/test_score_ground_truth.py)."""

import json

import numpy as np
import pytest

from conftest import run_python
from configs import mnist_score
from diffusion_jax import sampling, train


def tiny_command(workdir, data_dir, *overrides):
    return ['-m', 'diffusion_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
            f'--config.data.data_dir={data_dir}', '--config.sampling.num_samples=8',
            '--config.sampling.batch_size=8', *overrides]


def read_samples(workdir):
    with np.load(workdir / 'samples.npz') as f:
        return f['images']


def test_vp_sde_trains_samples_with_pc_and_ode_and_evaluates(tmp_path, data_dir):
    workdir = tmp_path / 'vp'
    command = tiny_command(workdir, data_dir, '--config.diffusion.process=vp',
                           '--config.diffusion.num_timesteps=50', '--config.sampling.sampler=pc',
                           '--config.sampling.predictor=euler_maruyama')
    run_python(command, fast_compiles=True)
    pc_samples = read_samples(workdir)
    assert pc_samples.shape == (8, 8, 8, 1) and pc_samples.std() > 0
    run_python(command + ['--mode=sample', '--config.sampling.sampler=ode'], fast_compiles=True)
    ode_samples = read_samples(workdir)
    assert ode_samples.shape == (8, 8, 8, 1) and not np.array_equal(ode_samples, pc_samples)
    run_python(command + ['--mode=eval', '--config.eval.num_images=8',
                          '--config.eval.batch_size=8'], fast_compiles=True)
    results = json.loads((workdir / 'eval.json').read_text())
    assert results['likelihood'] == 'probability_flow_ode' and results['num_images'] == 8
    assert 0 < results['bits_per_dim'] < 30 and min(results['ode_solver_steps']) > 2


def test_ncsn_trains_and_samples_with_annealed_langevin(tmp_path, data_dir):
    workdir = tmp_path / 'ncsn'
    run_python(tiny_command(workdir, data_dir, '--config.diffusion.process=ncsn',
                            '--config.diffusion.num_timesteps=4', '--config.diffusion.sigma_max=1',
                            '--config.sampling.sampler=langevin',
                            '--config.sampling.n_steps_each=5', '--config.sampling.chunk_size=5'),
               fast_compiles=True)
    samples = read_samples(workdir)
    assert samples.shape == (8, 8, 8, 1) and samples.std() > 0
    assert (workdir / 'progressive.png').is_file()


def test_wrong_sampler_for_the_process_fails_before_training(tmp_path, data_dir):
    result = run_python(tiny_command(tmp_path / 'bad', data_dir, '--config.diffusion.process=ve',
                                     '--config.sampling.sampler=ddim'), check=False)
    assert result.returncode != 0
    assert "sampling.sampler='ddim' does not apply to a VESDE process; valid: pc, ode" in (
        result.stderr)
    assert not (tmp_path / 'bad' / 'checkpoints').exists()


@pytest.mark.parametrize('process', ['vp', 'subvp', 've', 'ncsn'])
def test_score_configs_pair_each_process_with_its_sampler(process):
    config = mnist_score.get_config(process)
    sampling.check_sampling_config(config.sampling, train.make_diffusion(config.diffusion))
    assert train.make_model(config).out_ch == 1


def test_toy2d_mlp_trains_in_seconds_and_passes_looser_ground_truth_checks(tmp_path):
    workdir = tmp_path / 'toy'
    run_python(['-m', 'diffusion_jax.main', '--config=configs/toy2d.py', f'--workdir={workdir}'])
    m = json.loads((workdir / 'toy_metrics.json').read_text())
    assert m['mmd2'] < m['mmd2_data'] + 0.01, m
    assert m['sliced_w2'] < m['sliced_w2_data'] + 0.2, m
    assert abs(m['ode_log_likelihood'] - m['true_log_likelihood']) < 0.15, m
    assert (workdir / 'toy.png').stat().st_size > 10_000
