"""FSDP parameter sharding (`parallel.state_shardings` rules): the rule format in-process, and in
subprocesses with fake CPU devices (tests/fsdp_check.py) training replicated vs FSDP (jit) vs
sharded Adam moments (`OPTIMIZER_STATE_RULES`, shard_map), the last two also with the batch in
two microbatches (gradient accumulation), on 8 devices and restoring the FSDP
checkpoint onto 2 devices (FSDP) and 1 device (replicated).

The subprocesses compile with XLA optimizations off (conftest.run_python(fast_compiles=True)):
the replicated and FSDP runs share that setting, and compiling dominates their time.
"""

import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from conftest import run_python
from diffusion_jax import parallel, train_state

NUM_STEPS = 3  # As tests/fsdp_check.py.


def abstract_tree(**shapes):
    """{name: ShapeDtypeStruct} from name=shape keywords ('__' in a name nests: 'a__b')."""
    tree = {}
    for name, shape in shapes.items():
        *outer, leaf = name.split('__')
        node = tree
        for key in outer:
            node = node.setdefault(key, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return tree


def specs(tree, mesh, rules):
    shardings = parallel.state_shardings(tree, mesh, rules=rules)
    return {jax.tree_util.keystr(path, simple=True, separator='/'): s.spec
            for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


MESH_8 = AbstractMesh((8,), ('data',))


# ------------------------------------------------------------------ rule format (in-process) ---

def test_specs_are_right_aligned():
    tree = abstract_tree(conv__kernel=(3, 3, 8, 16), dense__kernel=(8, 16), bias=(16,))
    assert specs(tree, MESH_8, ((r'kernel$', 'data'),)) == {
        'conv/kernel': P(None, None, None, 'data'), 'dense/kernel': P(None, 'data'),
        'bias': P()}
    assert specs(tree, MESH_8, ((r'kernel$', 'data,None'),)) == {
        'conv/kernel': P(None, None, 'data', None), 'dense/kernel': P('data', None),
        'bias': P()}
    # Leading Nones need no axis; 'None' (or '') alone replicates.
    assert specs(tree, MESH_8, ((r'bias', ' None , data'), (r'conv', 'None'), (r'.*', ''))) == {
        'conv/kernel': P(), 'dense/kernel': P(), 'bias': P('data')}


def test_first_matching_rule_wins():
    tree = abstract_tree(conv_out__kernel=(3, 3, 16, 8), conv_in__kernel=(3, 3, 8, 16))
    except_out = ((r'conv_out/kernel$', 'None'), (r'kernel$', 'data'))
    assert specs(tree, MESH_8, except_out) == {'conv_out/kernel': P(),
                                               'conv_in/kernel': P(None, None, None, 'data')}
    assert specs(tree, MESH_8, except_out[::-1]) == {
        'conv_out/kernel': P(None, None, None, 'data'),
        'conv_in/kernel': P(None, None, None, 'data')}


def test_indivisible_or_too_short_leaves_fall_back_to_replicated(caplog):
    tree = abstract_tree(conv_out__kernel=(3, 3, 16, 3), conv_in__kernel=(3, 3, 3, 16),
                         bias=(16,))
    with caplog.at_level(logging.INFO):
        assert specs(tree, MESH_8, ((r'.*', 'data,None'),)) == {
            'conv_out/kernel': P(None, None, 'data', None), 'conv_in/kernel': P(), 'bias': P()}
    [record] = [r for r in caplog.records if 'Sharding rules' in r.getMessage()]
    message = record.getMessage()
    assert '2 leaves replicated' in message
    assert 'conv_in/kernel (3, 3, 3, 16)' in message and 'bias (16,)' in message
    assert 'conv_out' not in message


def test_scalars_are_always_replicated():
    state = {'step': jax.ShapeDtypeStruct((), jnp.int32),
             'w': jax.ShapeDtypeStruct((8,), jnp.float32)}
    assert specs(state, MESH_8, ((r'.*', 'data'),)) == {'step': P(), 'w': P('data')}


def test_no_rules_replicate_everything():
    tree = abstract_tree(conv__kernel=(3, 3, 8, 16), bias=(16,))
    assert set(specs(tree, MESH_8, ()).values()) == {P()}


@pytest.mark.parametrize('rule, what', [
    ((r'conv(', 'data'), 'bad regex'),
    ((r'kernel$', 'model'), 'mesh axes'),
    ((r'kernel$', 'data,data'), 'at most once'),
    ((r'kernel$', P('data')), 'must be a string'),
    ((r'kernel$',), 'not a (regex, spec) pair'),
    ('kernel$', 'not a (regex, spec) pair'),
])
def test_bad_rules_raise_naming_the_rule(rule, what):
    rules = ((r'bias$', 'None'), rule)
    with pytest.raises(ValueError, match=re.escape(repr(rule))) as error:
        parallel.state_shardings(abstract_tree(bias=(8,)), MESH_8, rules=rules)
    assert what in str(error.value)


def test_one_rule_shards_params_ema_and_adam_moments_alike():
    params = abstract_tree(conv__kernel=(3, 3, 8, 16), conv__bias=(16,), norm__scale=(16,))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = jax.eval_shape(lambda p: train_state.create_train_state(p, optimizer), params)
    got = specs(state, MESH_8, parallel.FSDP_RULES)
    kernel = P(None, None, None, 'data')
    assert {name for name, spec in got.items() if spec != P()} == {
        'params/conv/kernel', 'ema_params/conv/kernel', 'opt_state/1/0/mu/conv/kernel',
        'opt_state/1/0/nu/conv/kernel'}
    assert got['opt_state/1/0/nu/conv/kernel'] == kernel
    assert got['step'] == got['opt_state/1/0/count'] == P()


def test_optimizer_state_rules_shard_only_the_adam_moments_of_the_cifar10_unet():
    from configs import cifar10
    from diffusion_jax import train
    config = cifar10.get_config()
    # Pure data parallelism is the CIFAR-10 default (one all-reduce per step: docs/tpu.md).
    assert config.training.param_sharding == ()
    config.training.param_sharding = parallel.OPTIMIZER_STATE_RULES
    model = train.make_model(config)
    optimizer = train_state.make_optimizer(config.optim)
    state = jax.eval_shape(lambda rng: train_state.create_train_state(
        train.init_params(model, config, rng), optimizer), jax.random.key(0))
    got = specs(state, MESH_8, config.training.param_sharding)
    sharded = {name for name, spec in got.items() if spec != P()}
    kernels = {name for name in got if name.startswith('params/') and name.endswith('kernel')}
    moments = {f'opt_state/1/0/{m}/{name[len("params/"):]}' for m in ('mu', 'nu')
               for name in kernels - {'params/conv_out/kernel'}}  # 3 outputs: 3 % 8 != 0.
    assert sharded == moments
    assert all(got[name][-1] == 'data' and not any(got[name][:-1]) for name in sharded)
    sizes = {jax.tree_util.keystr(path, simple=True, separator='/'): x.size
             for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    # Of the state's four network-sized trees, the two moments are (nearly all) split.
    assert 0.49 < sum(sizes[n] for n in sharded) / sum(sizes.values()) < 0.5


def test_fsdp_rules_shard_every_kernel_of_the_256_unet_but_the_rgb_output():
    from configs import celebahq
    from diffusion_jax import train
    config = celebahq.get_config()
    model = train.make_model(config)
    params = jax.eval_shape(lambda rng: train.init_params(model, config, rng), jax.random.key(0))
    got = specs(params, MESH_8, parallel.FSDP_RULES)
    sharded = {name for name, spec in got.items() if spec != P()}
    kernels = {name for name in got if name.endswith('kernel')}
    assert sharded == kernels - {'conv_out/kernel'}
    assert all(got[name][-1] == 'data' and not any(got[name][:-1]) for name in sharded)
    sizes = {jax.tree_util.keystr(path, simple=True, separator='/'): x.size
             for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sum(sizes[n] for n in sharded) / sum(sizes.values()) > 0.99


def test_shard_map_mode_refuses_sharded_parameters_but_not_a_sharded_optimizer_state():
    mesh = parallel.make_mesh(jax.devices()[:1])
    params = abstract_tree(dense__kernel=(4, 8))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = jax.eval_shape(lambda p: train_state.create_train_state(p, optimizer), params)
    kwargs = dict(loss_fn=lambda *args: (0.0, {}), optimizer=optimizer, optim_config=None,
                  process=None, mesh=mesh)
    fsdp = parallel.state_shardings(state, mesh, rules=parallel.FSDP_RULES)
    with pytest.raises(ValueError, match="parallel='jit'"):
        parallel.build_train_step(shardings=fsdp, mode='shard_map', **kwargs)
    parallel.build_train_step(shardings=fsdp, mode='jit', **kwargs)
    for rules in ((), parallel.OPTIMIZER_STATE_RULES):
        parallel.build_train_step(shardings=parallel.state_shardings(state, mesh, rules=rules),
                                  mode='shard_map', **kwargs)


# ------------------------------------------------------- 8 fake devices, then 2 and 1 (slow) ---

def load(out_dir, name):
    with open(out_dir / f'{name}.json') as f:
        return dict(np.load(out_dir / f'{name}.npz')), json.load(f)


@pytest.fixture(scope='module')
def out_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('fsdp')
    run_python(['tests/fsdp_check.py', 'train', str(out)], num_devices=8, fast_compiles=True)
    return out


@pytest.fixture(scope='module')
def runs(out_dir):
    return {name: load(out_dir, name)
            for name in ('replicated', 'fsdp', 'fsdp_microbatched', 'optimizer_state')}


def groups(arrays):
    """The state's leaves of each kind, flattened in the same (name) order."""
    names = sorted(n for n in arrays if n.startswith('params/'))
    prefixes = {'params': 'params/', 'ema_params': 'ema_params/', 'mu': 'opt_state/1/0/mu/',
                'nu': 'opt_state/1/0/nu/'}
    return {kind: np.concatenate([arrays[prefix + n[len('params/'):]].ravel() for n in names])
            for kind, prefix in prefixes.items()}


@pytest.mark.slow
def test_fsdp_state_is_sharded(runs):
    facts = runs['fsdp'][1]['shardings']
    sharded = 0
    for name, fact in facts.items():
        if name.endswith('kernel') and not name.endswith('conv_out/kernel'):
            sharded += 1
            assert fact['spec'] == [None] * (len(fact['shape']) - 1) + ['data'], name
            assert fact['shard_shape'] == fact['shape'][:-1] + [fact['shape'][-1] // 8], name
        else:  # Biases, norm scales, scalars, and the 1-channel conv_out (1 % 8 != 0).
            assert not any(fact['spec']) and fact['shard_shape'] == fact['shape'], name
        assert fact['num_devices'] == 8
    num_kernels = sum(name.startswith('params/') and name.endswith('kernel') for name in facts)
    assert sharded == 4 * (num_kernels - 1) > 100  # params, EMA, mu, nu.
    assert not any(any(f['spec']) for f in runs['replicated'][1]['shardings'].values())


@pytest.mark.slow
def test_optimizer_state_rules_shard_only_the_moments(runs):
    facts = runs['optimizer_state'][1]['shardings']
    sharded = {name for name, fact in facts.items() if any(fact['spec'])}
    moments = ('opt_state/1/0/mu/', 'opt_state/1/0/nu/')
    assert sharded == {name for name in facts if name.startswith(moments)
                       and name.endswith('kernel') and not name.endswith('conv_out/kernel')}
    assert all(facts[n]['shard_shape'][-1] * 8 == facts[n]['shape'][-1] for n in sharded)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['fsdp', 'fsdp_microbatched', 'optimizer_state'],
                         ids=['fsdp_jit', 'fsdp_jit_microbatched',
                              'optimizer_state_shard_map_microbatched'])
def test_sharded_training_matches_replicated(runs, name):
    (replicated, rep_info), (sharded, sharded_info) = runs['replicated'], runs[name]
    # Measured: losses equal to 1e-7 relative, gradient norms (before clipping, so they would
    # show a gradient summed instead of averaged over devices) equal.
    np.testing.assert_allclose(sharded_info['losses'], rep_info['losses'], rtol=1e-5)
    np.testing.assert_allclose(sharded_info['grad_norms'], rep_info['grad_norms'], rtol=1e-5)
    assert int(sharded['step']) == int(replicated['step']) == NUM_STEPS
    rep, got = groups(replicated), groups(sharded)
    # Adam's moments are linear in the gradients: measured 2e-7 of their scale apart.
    for kind in ('mu', 'nu'):
        np.testing.assert_allclose(got[kind], rep[kind], rtol=0,
                                   atol=2e-6 * np.abs(rep[kind]).max(), err_msg=kind)
    # Parameters and EMA: equal to float32 rounding (measured 6e-8) wherever the gradient is
    # not zero up to rounding. It is for 64 of 45k entries, |g| ~ 1e-11: the attention key biases
    # (softmax ignores a shift of every logit) and one temb_dense0 weight. There Adam divides
    # rounding noise by its own size and steps by up to the learning rate: measured 1.5-3.5% of
    # the summed learning rate apart.
    live = np.sqrt(rep['nu']) > 1e-8
    assert live.mean() > 0.99
    from configs import tiny
    lr_sum = sum(float(train_state.make_lr_schedule(tiny.get_config().optim)(step))
                 for step in range(NUM_STEPS))
    for kind in ('params', 'ema_params'):
        np.testing.assert_allclose(got[kind][live], rep[kind][live], rtol=0, atol=1e-6,
                                   err_msg=kind)
        np.testing.assert_allclose(got[kind], rep[kind], rtol=0, atol=0.2 * lr_sum,
                                   err_msg=kind)


@pytest.mark.slow
def test_training_moved_the_state(runs, out_dir):
    # Guards the comparisons above against a step that silently does nothing.
    rep_info = runs['replicated'][1]
    assert np.all(np.isfinite(rep_info['losses']))
    assert not np.allclose(rep_info['losses'][0], rep_info['losses'][-1])
    init = groups(dict(np.load(out_dir / 'init.npz')))
    moved = np.abs(groups(runs['replicated'][0])['params'] - init['params'])
    assert moved.max() > 100 * 1e-6 and np.median(moved) > 1e-5


@pytest.fixture(scope='module', params=[(2, 'fsdp'), (1, 'none')],
                ids=['fsdp_on_2_devices', 'replicated_on_1_device'])
def restored(request, out_dir):
    num_devices, rules = request.param
    name = f'restored_{num_devices}'
    run_python(['tests/fsdp_check.py', 'restore', str(out_dir), name, rules],
               num_devices=num_devices, fast_compiles=True)
    return num_devices, load(out_dir, name)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(runs, restored):
    num_devices, (arrays, info) = restored
    saved = runs['fsdp'][0]
    assert sorted(arrays) == sorted(saved)
    for name, value in saved.items():
        assert arrays[name].dtype == value.dtype and np.array_equal(arrays[name], value), name
    assert info['step'] == NUM_STEPS and info['data_state'] == {'epoch': 1, 'position': 48}
    assert info['device_count'] == num_devices
    facts = info['shardings']
    conv_in = facts['params/conv_in/kernel']  # [3, 3, 1, 8]
    if num_devices == 2:
        assert conv_in['spec'] == [None, None, None, 'data'] and conv_in['shard_shape'][-1] == 4
        assert not any(facts['opt_state/1/0/nu/conv_out/kernel']['spec'])  # 1 output channel.
    else:
        assert not any(any(f['spec']) for f in facts.values())
    assert all(f['num_devices'] == num_devices for f in facts.values())


# ------------------------------------------------------------ the CLI with FSDP rules (slow) ---

@pytest.mark.slow
def test_cli_trains_with_fsdp_rules_and_resumes_replicated(tmp_path, data_dir):
    """`training.param_sharding` from the command line: an FSDP run on 2 devices, then the same
    workdir resumed by a replicated run on 1 device."""
    command = ['-m', 'diffusion_jax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}',
               f'--config.data.data_dir={data_dir}', '--config.sampling.num_samples=0',
               '--config.training.num_train_steps=2']
    result = run_python(command + ["--config.training.param_sharding=(('kernel$', 'data'),)"],
                        num_devices=2, fast_compiles=True)
    assert 'leaves replicated' in result.stderr  # The 1-channel conv_out kernel.
    result = run_python(command[:-1] + ['--config.training.num_train_steps=3'],
                        fast_compiles=True)
    assert 'Restored checkpoint at step 2' in result.stderr
    assert (tmp_path / 'checkpoints' / '3').is_dir()
