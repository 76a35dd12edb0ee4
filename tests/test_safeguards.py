"""The NaN policy: `fail` names the step and metric, `skip` drops exactly the non-finite updates
and stops after K in a row; in both, what is saved stays finite and restorable."""

import os

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import checkpointing, parallel, reporting, safeguards, train, train_state

pytestmark = pytest.mark.usefixtures('fast_compiles')


def test_fail_names_step_and_first_metric():
    guard = safeguards.NanGuard('fail', 3)
    metrics = [{'loss': np.float32(1.0), 'grad_norm': np.float32(2.0)},
               {'loss': np.float32(3.0), 'grad_norm': np.float32(4.0)}]
    assert guard.check(metrics, first_step=10) == {'loss': 2.0, 'grad_norm': 3.0}
    metrics[1]['grad_norm'] = np.float32(np.inf)
    with pytest.raises(FloatingPointError, match=r'non-finite grad_norm \(inf\) at step 12'):
        guard.check(metrics, first_step=10)


def test_skip_counts_excludes_and_stops_after_k_in_a_row():
    guard = safeguards.NanGuard('skip', 2)
    ok = {'loss': np.float32(1.0), 'skipped': np.int32(0)}
    bad = {'loss': np.float32(np.nan), 'skipped': np.int32(1)}
    assert guard.check([ok, bad, bad, ok], first_step=0) == {
        'loss': 1.0, 'skipped': 0.0, 'nan_skips': 2.0}
    assert guard.check([bad, bad], first_step=4) == {'nan_skips': 4.0}  # All skipped: no loss.
    with pytest.raises(FloatingPointError, match='3 consecutive non-finite steps .*step 7.*'
                       'max_consecutive_skips=2'):
        guard.check([bad], first_step=6)


def test_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError, match="Unknown training.nan_policy 'ignore'; valid: fail, skip"):
        safeguards.NanGuard('ignore', 1)


def one_step(config, batch, skip):
    model = train.make_model(config)
    diffusion = train.make_diffusion(config.diffusion)
    optimizer = train_state.make_optimizer(config.optim)
    mesh = parallel.make_mesh()
    with jax.threefry_partitionable(False):
        params = train.init_params(model, config, jax.random.key(3))
    state = train_state.create_train_state(params, optimizer)
    config.training.nan_policy = 'skip' if skip else 'fail'
    step = train.build_step(config, model, diffusion, optimizer, mesh,
                            parallel.state_shardings(state, mesh))
    before = jax.device_get(state)
    after, metrics = step(state, {'image': batch, 'label': np.zeros(len(batch), np.int32)},
                          jax.random.key(0))
    return before, jax.device_get(after), jax.device_get(metrics)


def test_skip_step_drops_exactly_the_non_finite_update():
    config = tiny.get_config()
    batch = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
    _, plain, _ = one_step(config, batch, skip=False)
    _, kept, metrics = one_step(config, batch, skip=True)
    assert metrics['skipped'] == 0
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(a, b)  # A finite step is unchanged by the policy.
    batch[3, 2, 2, 0] = np.nan
    before, after, metrics = one_step(config, batch, skip=True)
    assert metrics['skipped'] == 1 and not np.isfinite(metrics['loss'])
    assert after.step == before.step + 1
    for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                    jax.tree.leaves((after.params, after.ema_params, after.opt_state))):
        np.testing.assert_array_equal(a, b)


class PoisonedPipeline:
    """A real pipeline whose batches `poisoned` (0-based batch numbers) hold a NaN pixel."""

    def __init__(self, pipeline, poisoned):
        self.pipeline, self.poisoned = pipeline, set(poisoned)

    def next(self):
        k = self.pipeline.get_state()['next_batch']
        batch = self.pipeline.next()
        if k in self.poisoned:
            batch['image'][0, 0, 0, 0] = np.nan
        return batch

    def __getattr__(self, name):
        return getattr(self.pipeline, name)


def run_poisoned(monkeypatch, workdir, data_dir, poisoned, **training):
    real = train.make_input_pipeline
    monkeypatch.setattr(train, 'make_input_pipeline',
                        lambda config: PoisonedPipeline(real(config), poisoned))
    config = tiny.get_config()
    config.data.data_dir = data_dir
    config.sampling.num_samples = 0
    config.training.update(dict(log_every=1, checkpoint_every=1, num_train_steps=6), **training)
    return train.train_and_evaluate(config, str(workdir))


def test_fail_policy_stops_at_the_nan_step_and_keeps_the_checkpoints(monkeypatch, tmp_path,
                                                                     data_dir):
    with pytest.raises(FloatingPointError, match=r'non-finite loss \(nan\) at step 3'):
        run_poisoned(monkeypatch, tmp_path, data_dir, poisoned=[2])
    manager = checkpointing.make_manager(str(tmp_path), keep=10)
    assert max(manager.all_steps()) == 2  # Nothing at or after the NaN step was saved.


def test_skip_policy_drops_the_nan_steps_and_finishes(monkeypatch, tmp_path, data_dir):
    run_poisoned(monkeypatch, tmp_path, data_dir, poisoned=[2, 3], nan_policy='skip',
                 keep_checkpoints=10)
    rows = {r['step']: r for r in reporting.read_metrics(tmp_path / 'metrics.jsonl')}
    assert [rows[s]['nan_skips'] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert 'loss' not in rows[3] and np.isfinite(rows[5]['loss'])
    manager = checkpointing.make_manager(str(tmp_path), keep=10)
    params = {s: jax.tree.leaves(manager.restore(s).state['params']) for s in (2, 3, 4, 5)}
    for a, b, c in zip(params[2], params[3], params[4]):  # Steps 3 and 4 changed nothing.
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert any(not np.array_equal(a, b) for a, b in zip(params[4], params[5]))


def test_skip_policy_stops_after_k_in_a_row(monkeypatch, tmp_path, data_dir):
    with pytest.raises(FloatingPointError, match='2 consecutive non-finite steps'):
        run_poisoned(monkeypatch, tmp_path, data_dir, poisoned=[2, 3], nan_policy='skip',
                     max_consecutive_skips=1)
    assert os.path.isdir(tmp_path / 'checkpoints' / '3')  # Skipped steps leave a finite state.
