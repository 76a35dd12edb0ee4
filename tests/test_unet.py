"""Tests for the DDPM U-Net port (diffusion_jax.models)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet
from diffusion_jax.models import layers

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8)
MNIST = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,), num_groups=8)
# Layers the original initialises with init_scale=0 (variance scale 1e-10).
NEAR_ZERO_LAYERS = ('conv2', 'proj_out', 'conv_out')


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _abstract_init(model, x_shape, t_shape=None, dtype=jnp.float32):
    x = jax.ShapeDtypeStruct(x_shape, dtype)
    t = jax.ShapeDtypeStruct((x_shape[0],) if t_shape is None else t_shape, jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t)


def _num_params(variables):
    return sum(math.prod(p.shape) for p in jax.tree.leaves(variables))


def _inputs(size, channels=3, batch=2):
    x = np.random.default_rng(1).standard_normal((batch, size, size, channels))
    x = jnp.asarray(x, jnp.float32)
    return x, jnp.array([0, 999], jnp.int32)[:batch]


def _random_params(variables, seed=0, std=0.1):
    """Gaussian values shaped like `variables`, drawn by host NumPy so that no per-shape RNG
    kernels have to compile."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(std * rng.standard_normal(p.shape), jnp.float32),
                        variables)


@functools.cache
def _jit_apply(model):
    return jax.jit(model.apply, static_argnames='train')


@pytest.fixture(scope='module')
def tiny():
    """The TINY model with its real initialisation (compiled once for the whole module)."""
    model = UNet(**TINY)
    x, t = _inputs(16)
    return model, jax.jit(model.init)(jax.random.key(0), x, t), x, t


@pytest.mark.parametrize('config, size, expected', [
    (dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
     32, 35_746_307),
    (dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
          dropout=0.0), 256, 113_673_219),
])
def test_parameter_count_matches_paper(config, size, expected):
    assert _num_params(_abstract_init(UNet(**config), (1, size, size, 3))) == expected


def test_attention_only_at_attn_resolutions():
    params = _abstract_init(UNet(), (1, 32, 32, 3))['params']
    attn = sorted(name for name in params if 'attn' in name)
    # Level 1 of the CIFAR-10 net runs at 16x16; the middle always has attention.
    assert attn == ['down_1_attn_0', 'down_1_attn_1', 'mid_attn_1',
                    'up_1_attn_0', 'up_1_attn_1', 'up_1_attn_2']


def test_submodule_names_follow_original_scopes():
    params = _abstract_init(UNet(**TINY), (1, 16, 16, 3))['params']
    assert {'temb_dense0', 'temb_dense1', 'conv_in', 'down_0_block_0', 'down_0_downsample',
            'down_1_block_0', 'down_1_attn_0', 'mid_block_1', 'mid_attn_1', 'mid_block_2',
            'up_1_block_1', 'up_1_upsample', 'up_0_block_1', 'norm_out', 'conv_out'} <= set(params)
    assert set(params['down_1_block_0']) == {'norm1', 'conv1', 'temb_proj', 'norm2', 'conv2',
                                             'nin_shortcut'}
    assert set(params['mid_attn_1']) == {'norm', 'q', 'k', 'v', 'proj_out'}


def test_bfloat16_compute_keeps_float32_params_and_output():
    model = UNet(**TINY, dtype=jnp.bfloat16)
    variables = _abstract_init(model, (2, 16, 16, 3))
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    out = jax.eval_shape(model.apply, variables, x, jnp.zeros((2,), jnp.int32))
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32


def test_init_matches_original(tiny):
    """variance_scaling(scale, fan_avg, uniform) kernels, zero biases, scale 1e-10 where the
    original passes init_scale=0."""
    _, variables, _, _ = tiny
    for path, p in jax.tree_util.tree_leaves_with_path(variables['params']):
        names = [k.key for k in path]
        p = np.asarray(p)
        if names[-1] == 'bias':
            np.testing.assert_array_equal(p, 0.0)
        elif names[-1] == 'scale':  # GroupNorm
            np.testing.assert_array_equal(p, 1.0)
        else:
            assert names[-1] == 'kernel'
            fan_avg = math.prod(p.shape[:-2]) * (p.shape[-2] + p.shape[-1]) / 2
            scale = 1e-10 if names[-2] in NEAR_ZERO_LAYERS else 1.0
            limit = math.sqrt(3 * scale / fan_avg)
            assert np.abs(p).max() <= limit, names
            assert np.abs(p).max() > 0.5 * limit, names  # the uniform fills its range


def test_fresh_model_outputs_near_zero(tiny):
    model, variables, x, t = tiny
    out = _jit_apply(model)(variables, x, t, train=False, rngs={'dropout': jax.random.key(0)})
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    # conv_out's weights are ~1e-6 (variance 1e-10 / fan_avg) on O(1) activations.
    assert 0 < float(jnp.max(jnp.abs(out))) < 1e-3


def test_mnist_shapes_with_odd_lowest_resolution():
    # 28 -> 14 -> 7: no power-of-two requirement, attention at 7x7.
    model = UNet(**MNIST, out_ch=1)
    x, t = _inputs(28, channels=1)
    params = _abstract_init(model, x.shape)['params']
    assert 'down_2_attn_0' in params and 'down_1_attn_0' not in params
    out = _jit_apply(model)({'params': _random_params(params)}, x, t)
    assert out.shape == (2, 28, 28, 1) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_out_ch_6_doubles_output_channels():
    model = UNet(**TINY, out_ch=6)
    variables = _abstract_init(model, (2, 16, 16, 3))
    assert variables['params']['conv_out']['kernel'].shape == (3, 3, TINY['ch'], 6)
    out = jax.eval_shape(model.apply, variables, *_inputs(16))
    assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32


def test_dropout_only_in_train_mode(tiny):
    model, variables, x, t = tiny
    # Perturb so the near-zero layers (conv2, proj_out, conv_out) pass the dropout noise on.
    variables = jax.tree.map(jnp.add, variables, _random_params(variables))
    apply = _jit_apply(model)
    k1, k2 = jax.random.key(11), jax.random.key(12)
    eval1 = apply(variables, x, t, train=False, rngs={'dropout': k1})
    eval2 = apply(variables, x, t, train=False, rngs={'dropout': k2})
    np.testing.assert_array_equal(eval1, eval2)
    assert float(jnp.std(eval1)) > 1e-2
    train1 = apply(variables, x, t, train=True, rngs={'dropout': k1})
    train2 = apply(variables, x, t, train=True, rngs={'dropout': k2})
    assert float(jnp.max(jnp.abs(train1 - train2))) > 1e-2
    np.testing.assert_array_equal(train1, apply(variables, x, t, train=True, rngs={'dropout': k1}))


@pytest.mark.parametrize('x_shape, t_shape', [
    ((16, 16, 3), (1,)),
    ((2, 16, 8, 3), (2,)),
    ((2, 16, 16, 3), (3,)),
    ((2, 16, 16, 3), ()),
])
def test_rejects_bad_shapes(x_shape, t_shape):
    with pytest.raises(ValueError, match='shape'):
        _abstract_init(UNet(**TINY), x_shape, t_shape)


def _np_timestep_embedding(t, dim):
    """Float64 transcription of the original's get_timestep_embedding."""
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    emb = t.astype(np.float64)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2)))


@pytest.mark.parametrize('dim', [128, 33])
@pytest.mark.parametrize('integer', [True, False])
def test_timestep_embedding_matches_numpy(dim, integer):
    rng = np.random.default_rng(dim)
    t = rng.integers(0, 1000, size=16) if integer else rng.uniform(0, 1000, size=16)
    t_jax = jnp.asarray(t, jnp.int32 if integer else jnp.float32)
    emb = layers.get_timestep_embedding(t_jax, dim)
    assert emb.shape == (16, dim) and emb.dtype == jnp.float32
    # float32 phases t * freq (t < 1000) carry ~1e-4 absolute error; a wrong formula is O(1) off.
    np.testing.assert_allclose(emb, _np_timestep_embedding(np.asarray(t_jax), dim), atol=2e-4)


def _np_group_norm(x, groups, scale, bias, eps=1e-6):
    B, H, W, C = x.shape
    g = x.reshape(B, H, W, groups, C // groups)
    mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(x.shape) * scale + bias


@pytest.mark.parametrize('shape,groups', [((3, 7, 5, 16), 8), ((2, 4, 4, 12), 3),
                                          ((2, 6, 6, 8), 8), ((4, 3, 3, 32), 1)])
def test_group_norm_matches_numpy_and_flax(shape, groups):
    rng = np.random.default_rng(sum(shape) + groups)
    # An offset and a spread per channel, so that E[x^2] - E[x]^2 is tested off zero mean.
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, shape[-1])
         + rng.uniform(-2, 2, shape[-1]))
    scale, bias = rng.uniform(0.5, 1.5, shape[-1]), rng.standard_normal(shape[-1])
    params = {'params': {'scale': jnp.asarray(scale, jnp.float32),
                         'bias': jnp.asarray(bias, jnp.float32)}}
    x32 = jnp.asarray(x, jnp.float32)
    out = layers.group_norm(groups, name='norm').apply(params, x32)
    assert out.dtype == jnp.float32
    expected = _np_group_norm(x, groups, scale, bias)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    flax_out = nn.GroupNorm(num_groups=groups, epsilon=layers.GROUP_NORM_EPSILON).apply(
        params, x32)
    np.testing.assert_allclose(out, flax_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='5 groups do not divide'):
        layers.group_norm(5, name='norm').init(jax.random.key(0), x32)


def _np_conv3x3(x, p):
    """Float64 3x3 stride-1 'SAME' convolution."""
    _, H, W, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(xp[:, dy:dy + H, dx:dx + W] @ p['kernel'][dy, dx]
               for dy in range(3) for dx in range(3)) + p['bias']


def _np_swish(x):
    return x / (1 + np.exp(-x))


def _np_resnet_block(x, temb, p, groups):
    """Float64 transcription of the original resnet_block (no dropout, nin shortcut)."""
    h = _np_conv3x3(_np_swish(_np_group_norm(x, groups, **p['norm1'])), p['conv1'])
    h = h + (_np_swish(temb) @ p['temb_proj']['kernel'] + p['temb_proj']['bias'])[:, None, None]
    h = _np_conv3x3(_np_swish(_np_group_norm(h, groups, **p['norm2'])), p['conv2'])
    return x @ p['nin_shortcut']['kernel'] + p['nin_shortcut']['bias'] + h


def test_resnet_block_matches_numpy():
    block = layers.ResnetBlock(out_ch=8, dropout=0.5, num_groups=4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 4)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, 12)), jnp.float32)
    shapes = jax.eval_shape(functools.partial(block.init, train=False), jax.random.key(0), x, temb)
    params = _random_params(shapes, std=0.3)['params']
    out = block.apply({'params': params}, x, temb, train=False)
    np_params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    expected = _np_resnet_block(np.asarray(x, np.float64), np.asarray(temb, np.float64),
                                np_params, groups=4)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def _np_attn_block(x, p, groups):
    """Float64 single-head softmax self-attention over all H*W positions, plus residual."""
    B, H, W, C = x.shape
    h = _np_group_norm(x, groups, p['norm']['scale'], p['norm']['bias'])
    q, k, v = ((h @ p[n]['kernel'] + p[n]['bias']).reshape(B, H * W, C) for n in 'qkv')
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(C)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    h = (w @ v).reshape(B, H, W, C)
    return x + h @ p['proj_out']['kernel'] + p['proj_out']['bias']


def test_attn_block_matches_numpy():
    block = layers.AttnBlock(num_groups=4)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 16)), jnp.float32)
    params = _random_params(jax.eval_shape(block.init, jax.random.key(0), x), std=0.3)['params']
    out = block.apply({'params': params}, x)
    np_params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    expected = _np_attn_block(np.asarray(x, np.float64), np_params, groups=4)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_downsample_pads_like_tf_same():
    down = layers.Downsample(with_conv=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
    params = _random_params(jax.eval_shape(down.init, jax.random.key(0), x))['params']
    out = down.apply({'params': params}, x)
    # TF 'SAME' with stride 2 on an even size pads only after: (0, 1).
    expected = jax.lax.conv_general_dilated(
        x, params['conv']['kernel'], (2, 2), ((0, 1), (0, 1)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + params['conv']['bias']
    assert out.shape == (1, 4, 4, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_resampling_without_conv():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 2)), jnp.float32)
    down = layers.Downsample(with_conv=False).apply({}, x)
    np.testing.assert_allclose(down, x.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4)), rtol=1e-6)
    up = layers.Upsample(with_conv=False).apply({}, x)
    assert up.shape == (1, 8, 8, 2)
    np.testing.assert_array_equal(up[:, ::2, ::2], x)
    np.testing.assert_array_equal(up[:, 1::2, 1::2], x)


def _conv3x3_same_grads_numpy(x, w, g):
    """float64 reference: y[b,h,w,o] = sum_{i,j,c} x_pad[b,h+i,w+j,c] W[i,j,c,o] ('SAME', zero
    padding 1); returns (dL/dx, dL/dW) of L = sum(y * g)."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    _, height, width, _ = x.shape
    x_pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dx_pad, dw = np.zeros_like(x_pad), np.zeros_like(w)
    for i in range(3):
        for j in range(3):
            window = x_pad[:, i:i + height, j:j + width]
            dw[i, j] = np.einsum('bhwc,bhwo->co', window, g)
            dx_pad[:, i:i + height, j:j + width] += np.einsum('bhwo,co->bhwc', g, w[i, j])
    return dx_pad[:, 1:-1, 1:-1], dw


@pytest.mark.parametrize('shape', [(2, 6, 6, 3, 5), (1, 5, 7, 4, 2)])
def test_matmul_conv_gradient_matches_numpy(shape):
    from diffusion_jax.models import conv
    b, h, w_, cin, cout = shape
    rng = np.random.default_rng(3)
    x = rng.standard_normal((b, h, w_, cin)).astype(np.float32)
    w = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
    g = rng.standard_normal((b, h, w_, cout)).astype(np.float32)

    def loss(conv_fn, x, w):
        y = conv_fn(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return jnp.sum(y * g)

    dx, dw = jax.grad(functools.partial(loss, conv.matmul_grad_conv_general_dilated),
                      argnums=(0, 1))(x, w)
    dx_ref, dw_ref = _conv3x3_same_grads_numpy(x, w, g)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
    # The forward pass is XLA's own convolution.
    y = conv.matmul_grad_conv_general_dilated(x, w, (1, 1), 'SAME',
                                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_array_equal(
        y, jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC')))


@pytest.mark.parametrize('shape,chunk_pixels', [((3, 6, 6, 3, 5), 36), ((2, 5, 7, 4, 2), 4096)],
                         ids=['one_image_per_chunk', 'one_chunk'])
def test_bf16_matmul_conv_and_its_gradient_match_numpy(monkeypatch, shape, chunk_pixels):
    from diffusion_jax.models import conv
    monkeypatch.setattr(conv, 'BF16_CHUNK_PIXELS', chunk_pixels)
    b, h, w_, cin, cout = shape
    rng = np.random.default_rng(7)
    x, w, g = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
               for s in ((b, h, w_, cin), (3, 3, cin, cout), (b, h, w_, cout)))
    dims = ('NHWC', 'HWIO', 'NHWC')

    def conv_fn(x, w):
        return conv.bf16_matmul_conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dims)

    y, vjp = jax.vjp(conv_fn, x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    x_pad = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y_ref = sum(np.einsum('bhwc,co->bhwo', x_pad[:, i:i + h, j:j + w_], w64[i, j])
                for i in range(3) for j in range(3))
    dx_ref, dw_ref = _conv3x3_same_grads_numpy(x64, w64, g64)
    # Operands are exact in bfloat16 and the sums float32: the error is the bfloat16 rounding of
    # the result, at most 2^-8 of each entry (a wrong tap or chunk would be O(1)).
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8, atol=1e-6)


def test_auto_takes_the_bf16_matmul_conv_only_for_wide_bf16_layers_on_cpus_with_bf16_units(
        monkeypatch):
    from diffusion_jax.models import conv
    auto = conv.conv_general_dilated('auto')

    def dots(dtype, channels=conv.AUTO_MIN_CHANNELS):
        x = jnp.zeros((2, 8, 8, channels), dtype)
        w = jnp.zeros((3, 3, channels, channels), dtype)
        return str(jax.make_jaxpr(lambda x, w: auto(
            x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w)).count(
                'dot_general')

    monkeypatch.setattr(conv, 'cpu_has_bf16_matmul', lambda: True)
    assert dots(jnp.bfloat16) == 3 and dots(jnp.float32) == 0
    assert dots(jnp.bfloat16, channels=conv.AUTO_MIN_CHANNELS - 1) == 0  # Narrow: XLA's.
    monkeypatch.setattr(conv, 'cpu_has_bf16_matmul', lambda: False)
    assert dots(jnp.bfloat16) == 0


def test_unet_gradient_same_with_matmul_and_xla_backward():
    x, t = _inputs(8, channels=1)
    models = {impl: UNet(**dict(TINY, out_ch=1, dropout=0.0), conv_backward=impl)
              for impl in ('xla', 'matmul')}
    params = _random_params(_abstract_init(models['xla'], x.shape)['params'])
    target = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)

    def grads(model):
        def loss(p):
            return jnp.mean((model.apply({'params': p}, x, t) - target) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_xla, g_xla), (loss_matmul, g_matmul) = grads(models['xla']), grads(models['matmul'])
    np.testing.assert_allclose(loss_matmul, loss_xla, rtol=1e-6)
    for path, a in jax.tree_util.tree_leaves_with_path(g_matmul):
        b = functools.reduce(lambda d, k: d[k.key], path, g_xla)
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_conv_backward_falls_back_to_xla_and_rejects_unknown_names():
    from diffusion_jax.models import conv
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 6, 6, 2)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(6).standard_normal((3, 3, 2, 2)), jnp.float32)

    def grad_of(conv_fn):
        return jax.grad(lambda w: jnp.sum(conv_fn(
            x, w, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) ** 2))(w)

    # Stride 2 is not the custom path: the result is XLA's exactly.
    np.testing.assert_array_equal(grad_of(conv.matmul_grad_conv_general_dilated),
                                  grad_of(jax.lax.conv_general_dilated))
    # 'auto' picks by the platform a program is compiled for (tests/test_aot.py); on the CPU it
    # is auto_cpu_conv_general_dilated's choice:
    assert conv.conv_general_dilated('auto') is conv.auto_conv_general_dilated
    auto = conv.auto_cpu_conv_general_dilated

    def dots_in_gradient(channels):
        x = jnp.zeros((1, 4, 4, channels))
        w = jnp.zeros((3, 3, channels, channels))
        jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(auto(
            x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))))(w)
        return str(jaxpr).count('dot_general')

    # Small layers keep XLA's gradient (convolutions only), large ones get the nine matmuls.
    assert dots_in_gradient(conv.AUTO_MIN_CHANNELS - 1) == 0
    assert dots_in_gradient(conv.AUTO_MIN_CHANNELS) == 9
    with pytest.raises(ValueError, match="conv_backward 'fast'"):
        conv.conv_general_dilated('fast')
