"""Inception-v3 for FID / IS: the "FID Inception" network in Flax Linen.

This is the TensorFlow 2015 Inception graph (`inception-2015-12-05`) used by the original FID
(TTUR) and Inception Score (improved-gan) code, in the layout of pytorch-fid's
`fid_inception_v3()` (torchvision's Inception3 with `FIDInceptionA/C/E_1/E_2` blocks):

* avg-pool branches of Mixed_5b-d, 6b-e and 7b do not count the zero padding
  (`count_include_pad=False`), as TensorFlow's average pooling;
* the pool branch of Mixed_7c uses a 3x3/1 *max* pool (a quirk of that graph);
* the classifier has 1008 outputs (`fc`, 2048 -> 1008).

Inputs are NHWC images with values in [0, 255] (normally uint8). As pytorch-fid does, they are
resized bilinearly (half-pixel centres, no antialiasing, i.e. `F.interpolate(...,
mode='bilinear', align_corners=False)`) to 299x299 and scaled to [-1, 1].

Weights are never unpickled: `load_params` reads an `.npz` whose keys are the PyTorch
state-dict names of pytorch-fid's FID Inception (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_var`, `fc.bias`, ...); `scripts/convert_inception_weights.py`
writes it from `pt_inception-2015-12-05-6726825d.pth`.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL3_DIM = 2048
BN_EPS = 1e-3


def resize_bilinear(images, size=INPUT_SIZE):
    """Bilinear resize of NHWC images to size x size, matching PyTorch's
    `F.interpolate(mode='bilinear', align_corners=False)` (no antialiasing)."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method='bilinear', antialias=False)


class FrozenBatchNorm(nn.Module):
    """Inference-mode BatchNorm; running statistics are ordinary params."""
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,))
        bias = self.param('bias', nn.initializers.zeros, (c,))
        mean = self.param('mean', nn.initializers.zeros, (c,))
        var = self.param('var', nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3) -> relu."""
    features: int
    kernel_size: tuple = (1, 1)
    strides: tuple = (1, 1)
    padding: tuple = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=((ph, ph), (pw, pw)), use_bias=False, name='conv')(x)
        return nn.relu(FrozenBatchNorm(name='bn')(x))


def _conv(features, kernel_size=1, strides=1, padding=0, name=None):
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return BasicConv2d(features, pair(kernel_size), pair(strides), pair(padding), name=name)


def _avg_pool_same(x):
    # TF-style 3x3/1 average pool: padded zeros are not counted.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):  # Mixed_5b/5c/5d (FIDInceptionA)
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv(64, name='branch1x1')(x)
        b5 = _conv(48, name='branch5x5_1')(x)
        b5 = _conv(64, 5, padding=2, name='branch5x5_2')(b5)
        b3 = _conv(64, name='branch3x3dbl_1')(x)
        b3 = _conv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
        b3 = _conv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
        bp = _conv(self.pool_features, name='branch_pool')(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a
    @nn.compact
    def __call__(self, x):
        b3 = _conv(384, 3, strides=2, name='branch3x3')(x)
        bd = _conv(64, name='branch3x3dbl_1')(x)
        bd = _conv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
        bd = _conv(96, 3, strides=2, name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b-6e (FIDInceptionC)
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = _conv(192, name='branch1x1')(x)
        b7 = _conv(c7, name='branch7x7_1')(x)
        b7 = _conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
        b7 = _conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
        bd = _conv(c7, name='branch7x7dbl_1')(x)
        bd = _conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
        bd = _conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
        bd = _conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
        bd = _conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
        bp = _conv(192, name='branch_pool')(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a
    @nn.compact
    def __call__(self, x):
        b3 = _conv(192, name='branch3x3_1')(x)
        b3 = _conv(320, 3, strides=2, name='branch3x3_2')(b3)
        b7 = _conv(192, name='branch7x7x3_1')(x)
        b7 = _conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
        b7 = _conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
        b7 = _conv(192, 3, strides=2, name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (FIDInceptionE_1, 'avg'), Mixed_7c (FIDInceptionE_2, 'max')
    pool: str = 'avg'

    @nn.compact
    def __call__(self, x):
        b1 = _conv(320, name='branch1x1')(x)
        b3 = _conv(384, name='branch3x3_1')(x)
        b3 = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                              _conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], -1)
        bd = _conv(448, name='branch3x3dbl_1')(x)
        bd = _conv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
        bd = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                              _conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], -1)
        if self.pool == 'avg':
            pooled = _avg_pool_same(x)
        elif self.pool == 'max':
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f'pool must be "avg" or "max", got {self.pool!r}')
        bp = _conv(192, name='branch_pool')(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3. `__call__(images)` with NHWC images in [0, 255] (uint8) returns

    * `pool3`: [B, 2048] final average-pool features (FID);
    * `logits`: [B, 1008] `fc` output with its bias (pytorch-fid / torchvision layout);
    * `logits_unbiased`: [B, 1008] pool3 @ W without the bias -- what the original IS code
      (improved-gan, `softmax/logits/MatMul`) and torch-fidelity/torchmetrics feed to the softmax.

    `resize=False` skips the resize to 299x299 (pytorch-fid's `resize_input=False`).
    """
    resize: bool = True

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images).astype(jnp.float32)
        if self.resize and x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear(x, INPUT_SIZE)
        x = x * (2.0 / 255.0) - 1.0
        x = _conv(32, 3, strides=2, name='Conv2d_1a_3x3')(x)
        x = _conv(32, 3, name='Conv2d_2a_3x3')(x)
        x = _conv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
        x = _max_pool_valid(x)
        x = _conv(80, 1, name='Conv2d_3b_1x1')(x)
        x = _conv(192, 3, name='Conv2d_4a_3x3')(x)
        x = _max_pool_valid(x)
        x = InceptionA(32, name='Mixed_5b')(x)
        x = InceptionA(64, name='Mixed_5c')(x)
        x = InceptionA(64, name='Mixed_5d')(x)
        x = InceptionB(name='Mixed_6a')(x)
        x = InceptionC(128, name='Mixed_6b')(x)
        x = InceptionC(160, name='Mixed_6c')(x)
        x = InceptionC(160, name='Mixed_6d')(x)
        x = InceptionC(192, name='Mixed_6e')(x)
        x = InceptionD(name='Mixed_7a')(x)
        x = InceptionE('avg', name='Mixed_7b')(x)
        x = InceptionE('max', name='Mixed_7c')(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, name='fc')
        logits = fc(pool3)
        logits_unbiased = pool3 @ fc.variables['params']['kernel']
        return dict(pool3=pool3, logits=logits, logits_unbiased=logits_unbiased)


# ---------------------------------------------------------------------------------------------
# Weights: PyTorch state-dict names <-> Flax params.

# (last two Flax path components) -> (PyTorch suffix, Flax->PyTorch transpose or None)
_LEAF_MAP = {
    ('conv', 'kernel'): ('conv.weight', (3, 2, 0, 1)),  # HWIO -> OIHW
    ('bn', 'scale'): ('bn.weight', None),
    ('bn', 'bias'): ('bn.bias', None),
    ('bn', 'mean'): ('bn.running_mean', None),
    ('bn', 'var'): ('bn.running_var', None),
    ('fc', 'kernel'): ('fc.weight', (1, 0)),  # [in, out] -> [out, in]
    ('fc', 'bias'): ('fc.bias', None),
}
_IGNORED_SUFFIXES = ('num_batches_tracked',)


def _torch_name(path):
    suffix, perm = _LEAF_MAP[tuple(path[-2:])]
    return '.'.join(list(path[:-2]) + [suffix]), perm


@functools.lru_cache(maxsize=1)
def param_shapes():
    """{Flax param path (tuple of str): shape} of InceptionV3, from an abstract init."""
    abstract = jax.eval_shape(
        lambda: InceptionV3().init(jax.random.key(0),
                                   jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)))
    flat = jax.tree_util.tree_flatten_with_path(abstract['params'])[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _unflatten(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def params_to_state_dict(variables):
    """Inverse of `load_params`: Flax variables -> {PyTorch state-dict name: np.ndarray}."""
    params = variables['params'] if 'params' in variables else variables
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for path, leaf in flat:
        name, perm = _torch_name(tuple(k.key for k in path))
        arr = np.asarray(leaf)
        out[name] = np.ascontiguousarray(arr.transpose(perm) if perm else arr)
    return out


def state_dict_to_params(state_dict, source='state dict'):
    """{PyTorch state-dict name: array} -> Flax variables {'params': ...} (float32).

    Raises ValueError naming the first missing key, shape mismatch or unexpected key.
    """
    hint = ('expected the pytorch-fid FID Inception weights as an .npz of state-dict arrays '
            '(see scripts/convert_inception_weights.py)')
    flat = {}
    used = set()
    for path, shape in param_shapes().items():
        name, perm = _torch_name(path)
        if name not in state_dict:
            raise ValueError(f'{source}: missing key {name!r} (shape '
                             f'{_torch_shape(shape, perm)}); {hint}')
        arr = np.asarray(state_dict[name])
        want = _torch_shape(shape, perm)
        if arr.shape != want:
            raise ValueError(f'{source}: key {name!r} has shape {arr.shape}, expected {want}; '
                             f'{hint}')
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f'{source}: key {name!r} has dtype {arr.dtype}, expected float')
        arr = arr.astype(np.float32)
        flat[path] = np.ascontiguousarray(arr.transpose(np.argsort(perm)) if perm else arr)
        used.add(name)
    extra = sorted(k for k in state_dict
                   if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f'{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected in '
                         f'total); {hint}')
    return {'params': _unflatten(flat)}


def _torch_shape(flax_shape, perm):
    return tuple(flax_shape[i] for i in perm) if perm else tuple(flax_shape)


def load_params(path):
    """Loads FID Inception weights from an `.npz` of PyTorch state-dict arrays (no pickle).

    Returns Flax variables `{'params': ...}` for `InceptionV3().apply`.
    """
    path = os.fspath(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as e:
        raise errors.InputError(f'{path}: cannot read as an .npz without pickle ({e}); convert the '
                                '.pth with scripts/convert_inception_weights.py') from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise errors.InputError(
            f'{path}: a single .npy array, expected an .npz of state-dict arrays')
    with data:
        return state_dict_to_params(data, source=path)


def build_apply_fn(variables, model=None):
    """A jitted `images -> dict(pool3, logits, logits_unbiased)` for the given weights."""
    model = model or InceptionV3()
    variables = jax.tree_util.tree_map(jnp.asarray, variables)

    @jax.jit
    def apply(images):
        return model.apply(variables, images)

    return apply
