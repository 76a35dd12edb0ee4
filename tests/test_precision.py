"""The mixed-precision policy (model.dtype=bfloat16, model.param_dtype=float32): where each op runs,
and how far a bfloat16 model is from the float32 one it shares its parameters with."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny as tiny_config
from diffusion_jax import parallel
from diffusion_jax import sampling
from diffusion_jax import train
from diffusion_jax import train_state as train_state_lib
from diffusion_jax.models import UNet

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4,
            out_ch=1)
MATMULS = {'conv_general_dilated', 'dot_general'}
# Ops whose accuracy the policy keeps in float32: GroupNorm statistics, the softmax, the output.
FLOAT32_OPS = {'reduce_sum', 'reduce_max', 'exp', 'rsqrt', 'div'}
# The policy is decided in the jaxpr (which dtype each op gets), not by XLA's optimizations.
pytestmark = pytest.mark.usefixtures('fast_compiles')


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, 'jaxpr', sub)
                if hasattr(inner, 'eqns'):
                    yield from _equations(inner)


def _input_dtypes(eqn):
    return {v.aval.dtype for v in eqn.invars if hasattr(v.aval, 'dtype')}


def test_bfloat16_policy_runs_matmuls_in_bfloat16_and_statistics_in_float32():
    model = UNet(**TINY, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 8, 8, 1))
    t = jnp.zeros((2,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t)
    jaxpr = jax.make_jaxpr(model.apply)(params, x, t).jaxpr
    eqns = list(_equations(jaxpr))
    matmuls = [e for e in eqns if e.primitive.name in MATMULS]
    guarded = [e for e in eqns if e.primitive.name in FLOAT32_OPS]
    assert len(matmuls) > 20 and len(guarded) > 20
    assert all(_input_dtypes(e) == {jnp.dtype(jnp.bfloat16)} for e in matmuls), \
        sorted({str(_input_dtypes(e)) for e in matmuls})
    assert all(_input_dtypes(e) <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
               for e in guarded), sorted({f'{e.primitive} {_input_dtypes(e)}' for e in guarded})
    assert jaxpr.outvars[0].aval.dtype == jnp.float32


def test_param_dtype_sets_the_stored_parameters():
    x = jnp.zeros((2, 8, 8, 1))
    t = jnp.zeros((2,), jnp.int32)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        params = jax.eval_shape(UNet(**TINY, param_dtype=param_dtype).init, jax.random.key(0),
                                x, t)
        assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(param_dtype)}


@pytest.mark.parametrize('key,value', [('dtype', 'bf16'), ('param_dtype', 'float16')])
def test_unsupported_precision_is_named(key, value):
    config = tiny_config.get_config()
    config.model[key] = value
    with pytest.raises(ValueError, match=f'model.{key}=.{value}. is not a supported dtype'):
        train.make_model(config)


def _config(data_dir, dtype):
    config = tiny_config.get_config()
    config.data.data_dir = data_dir
    config.model.dtype = dtype
    return config


def _rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def test_bfloat16_tracks_float32_on_the_trained_model(trained_tiny, data_dir):
    """The shared trained tiny run's EMA weights, used in float32 and in bfloat16: the predicted
    noise, the loss on a batch of real digits and 20-step ancestral samples from one noise."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    fp32, bf16 = _config(data_dir, 'float32'), _config(data_dir, 'bfloat16')
    model32, params, _ = train.restore_ema_params(fp32, str(trained_tiny), mesh)
    model16 = train.make_model(bf16)
    diffusion = train.make_diffusion(fp32.diffusion)
    x0 = jnp.asarray(train.make_input_pipeline(fp32).next()['image'])
    rng_t, rng_noise = jax.random.split(jax.random.key(0))
    t = jax.random.randint(rng_t, (x0.shape[0],), 0, diffusion.num_timesteps)
    noise = jax.random.normal(rng_noise, x0.shape)
    x_t = diffusion.q_sample(x0, t, noise)
    eps = {name: train.make_model_apply(m)(params, x_t, t)
           for name, m in (('fp32', model32), ('bf16', model16))}
    loss = {name: float(jnp.mean((e - noise) ** 2)) for name, e in eps.items()}
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per op); measured 0.65%.
    assert _rel_rms(eps['bf16'], eps['fp32']) < 0.02
    assert abs(loss['bf16'] - loss['fp32']) < 0.005 * loss['fp32']
    samples = {}
    for name, m in (('fp32', model32), ('bf16', model16)):
        x_T = jax.random.normal(jax.random.key(1), x0.shape)
        samples[name], _ = sampling.reverse_steps(
            train.make_model_apply(m), params, diffusion, x_T, jax.random.key(2),
            jnp.int32(diffusion.num_timesteps - 1), num_steps=diffusion.num_timesteps)
    # Same noise, same per-step draws: the chains stay close; a float16 or all-bf16 policy
    # (GroupNorm in bfloat16) would not be guaranteed to.
    assert float(jnp.mean(jnp.abs(samples['bf16'] - samples['fp32']))) < 0.005


def test_bfloat16_training_follows_the_float32_loss_curve(data_dir):
    """12 steps from one initialisation on the same batches and keys: the bfloat16 loss curve
    stays within 5% of the float32 one at every step, and the parameters move the same way."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    curves, moved = {}, {}
    for dtype in ('float32', 'bfloat16'):
        config = _config(data_dir, dtype)
        model = train.make_model(config)
        optimizer = train_state_lib.make_optimizer(config.optim)
        state, shardings, _ = train.init_or_restore_state(config, model, optimizer, mesh, None)
        initial = jax.tree.map(np.asarray, state.params)
        step = train.build_step(config, model, train.make_diffusion(config.diffusion),
                                optimizer, mesh, shardings)
        pipeline = train.make_input_pipeline(config)
        losses = []
        for _ in range(12):
            batch = parallel.make_global_batch(pipeline.next(), mesh)
            state, metrics = step(state, batch, jax.random.key(config.seed))
            losses.append(float(metrics['loss']))
        curves[dtype] = np.array(losses)
        moved[dtype] = np.concatenate([np.ravel(p - p0) for p, p0 in zip(
            jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(initial))])
    np.testing.assert_allclose(curves['bfloat16'], curves['float32'], rtol=0.05)
    # The two runs' updates differ by a small fraction of how far either moved.
    difference = np.linalg.norm(moved['bfloat16'] - moved['float32'])
    assert difference < 0.1 * np.linalg.norm(moved['float32'])
