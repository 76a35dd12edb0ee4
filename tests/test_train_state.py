"""The optimizer and EMA of `diffusion_jax.train_state` against a float64 NumPy reference.

The reference is written from the papers, not from optax: global-norm clipping (Pascanu et al.
2013: g <- g * c / ||g|| when ||g|| > c, the norm over every leaf together), Adam (Kingma & Ba 2015,
Algorithm 1: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2, m^ = m / (1 - b1^k),
v^ = v / (1 - b2^k), theta <- theta - lr_k m^ / (sqrt(v^) + eps)), the DDPM warm-up
lr_k = lr * min(1, k / warmup_steps) for the k-th update counted from 0 (diffusion_tf's
`global_step / warmup` before the increment), and the EMA
ema <- d ema + (1 - d) theta_new with d = min(ema_decay, (1 + s) / (10 + s)) when ema_warmup, s the
step before the update.

Achieved max abs errors (jax 0.10.2, CPU) over 6 updates with lr 0.1 on parameters of order 1:
parameters <= 2.6e-6 and EMA <= 2.3e-6 with b2 = 0.999 (float32 cancellation in optax's
1 - b2^k), <= 3.2e-7 with b2 = 0.95; tolerance 1e-5, while parameters move by > 0.1.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax import train_state as ts

# Per-update gradient scales: with 21 entries ||g|| ~ 4.6 * scale, so clip 1.0 is active on the
# large ones and not on the small ones (checked in the reference run).
GRAD_SCALES = (0.05, 2.0, 0.1, 5.0, 0.02, 1.0)
# optax's float32 bias correction 1 - b2^k (b2 = 0.999) loses ~5 digits to cancellation, which
# gives ~2.5e-6 here; with b2 = 0.95 the error is ~3e-7.
TOL = 1e-5


def optim_config(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        learning_rate=0.1, warmup_steps=3, grad_clip=1.0, adam_b1=0.9, adam_b2=0.999,
        adam_eps=1e-8, ema_decay=0.9999, ema_warmup=True, lr_decay_steps=0))
    cfg.update(overrides)
    return cfg


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {'dense': {'kernel': rng.standard_normal((3, 4)).astype(np.float32),
                      'bias': rng.standard_normal((4,)).astype(np.float32)},
            'scale': rng.standard_normal((5,)).astype(np.float32)}


def random_grads(seed, scales=GRAD_SCALES):
    """Per update, a tree like `init_params` with per-leaf different magnitudes, times scale."""
    rng = np.random.default_rng(1000 + seed)
    out = []
    for s in scales:
        out.append({'dense': {'kernel': (s * rng.standard_normal((3, 4))).astype(np.float32),
                              'bias': (0.3 * s * rng.standard_normal((4,))).astype(np.float32)},
                    'scale': (2.0 * s * rng.standard_normal((5,))).astype(np.float32)})
    return out


# -------------------------------------------------------------------------------------------------
# The float64 reference
# -------------------------------------------------------------------------------------------------


def _leaves(tree):
    return jax.tree.leaves(tree)


def reference_run(params, grads_seq, cfg, clip):
    """float64 clipping + bias-corrected Adam + warm-up + EMA.

    Returns (list of (params, ema) after each update as lists of leaves, list of clip flags).
    """
    theta = [np.asarray(p, np.float64) for p in _leaves(params)]
    ema = [p.copy() for p in theta]
    m = [np.zeros_like(p) for p in theta]
    v = [np.zeros_like(p) for p in theta]
    b1, b2, eps, lr = cfg.adam_b1, cfg.adam_b2, cfg.adam_eps, cfg.learning_rate
    history, clipped = [], []
    for k, grads in enumerate(grads_seq):  # k: updates applied before this one
        g = [np.asarray(x, np.float64) for x in _leaves(grads)]
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
        do_clip = clip and cfg.grad_clip > 0 and norm > cfg.grad_clip
        clipped.append(do_clip)
        if do_clip:
            g = [x * (cfg.grad_clip / norm) for x in g]
        lr_k = lr * min(1.0, k / cfg.warmup_steps) if cfg.warmup_steps > 0 else lr
        n = k + 1
        for i in range(len(theta)):
            m[i] = b1 * m[i] + (1.0 - b1) * g[i]
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] ** 2
            m_hat = m[i] / (1.0 - b1 ** n)
            v_hat = v[i] / (1.0 - b2 ** n)
            theta[i] = theta[i] - lr_k * m_hat / (np.sqrt(v_hat) + eps)
        decay = cfg.ema_decay
        if cfg.ema_warmup:
            decay = min(decay, (1.0 + k) / (10.0 + k))
        ema = [decay * e + (1.0 - decay) * p for e, p in zip(ema, theta)]
        history.append(([p.copy() for p in theta], [e.copy() for e in ema]))
    return history, clipped


def max_err(got_tree, want_leaves):
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - b)))
               for a, b in zip(_leaves(got_tree), want_leaves))


# -------------------------------------------------------------------------------------------------
# The learning-rate schedule and the EMA decay
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('warmup', [1, 4, 5000])
def test_lr_schedule_linear_warmup(warmup):
    lr = 2e-4
    sched = ts.make_lr_schedule(optim_config(learning_rate=lr, warmup_steps=warmup))
    assert float(sched(0)) == 0.0
    assert float(sched(warmup)) == pytest.approx(lr, rel=1e-6)
    for k in sorted({1, warmup // 2, warmup - 1, warmup + 1, 3 * warmup, 10 ** 6}):
        # optax forms lr - lr (1 - k / W) in float32: absolute error ~ 1e-7 lr near k = 0.
        assert float(sched(k)) == pytest.approx(lr * min(1.0, k / warmup), rel=1e-5,
                                                abs=1e-6 * lr), k


def test_lr_schedule_without_warmup_is_constant():
    lr = 2e-4
    sched = ts.make_lr_schedule(optim_config(learning_rate=lr, warmup_steps=0))
    for k in (0, 1, 100):
        assert float(sched(k)) == pytest.approx(lr, rel=1e-6), k


@pytest.mark.parametrize('warmup,total', [(100, 2400), (0, 50), (7, 8)])
def test_lr_schedule_cosine_decay(warmup, total):
    # lr_k = lr k / W while k < W, then lr (1 + cos(pi (k - W) / (D - W))) / 2 until D, then 0.
    lr = 1e-3
    sched = ts.make_lr_schedule(optim_config(learning_rate=lr, warmup_steps=warmup,
                                             lr_decay_steps=total))
    ks = np.unique(np.r_[np.random.default_rng(total).integers(0, total + 10, 40),
                         0, warmup, total - 1, total, total + 5])
    for k in ks:
        want = (lr * k / warmup if k < warmup else
                lr * 0.5 * (1 + np.cos(np.pi * min(k - warmup, total - warmup) / (total - warmup))))
        assert float(sched(int(k))) == pytest.approx(want, rel=1e-5, abs=1e-6 * lr), k


def test_lr_decay_must_end_after_warmup():
    with pytest.raises(ValueError, match='lr_decay_steps=100 must exceed optim.warmup_steps=100'):
        ts.make_lr_schedule(optim_config(warmup_steps=100, lr_decay_steps=100))


@pytest.mark.parametrize('warmup,decay', [(True, 0.9999), (True, 0.15), (False, 0.9999),
                                          (False, 0.5)])
def test_ema_decay(warmup, decay):
    cfg = optim_config(ema_decay=decay, ema_warmup=warmup)
    for s in (0, 1, 2, 9, 90, 12345, 10 ** 7):
        want = min(decay, (1.0 + s) / (10.0 + s)) if warmup else decay
        got = float(ts.ema_decay(cfg, jnp.int32(s)))
        assert got == pytest.approx(want, rel=1e-6), (s, got, want)


# -------------------------------------------------------------------------------------------------
# create_train_state and apply_gradients
# -------------------------------------------------------------------------------------------------


def test_create_train_state():
    params = jax.tree.map(jnp.asarray, init_params(3))
    optimizer = ts.make_optimizer(optim_config())
    state = ts.create_train_state(params, optimizer)
    assert int(state.step) == 0 and state.step.dtype == jnp.int32
    for p, e in zip(_leaves(state.params), _leaves(state.ema_params)):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(e))
    want = optimizer.init(params)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(want)
    for a, b in zip(_leaves(state.opt_state), _leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


CASES = {
    # name: (config overrides, clip argument of make_optimizer)
    'paper_ema_warmup': (dict(), True),
    'no_ema_warmup': (dict(ema_warmup=False, ema_decay=0.6), True),
    'clip_false': (dict(ema_decay=0.9), False),
    'grad_clip_0': (dict(grad_clip=0.0), True),
    # A large eps, other betas and an EMA decay that min() picks at some steps but not at others
    # ((1 + s) / (10 + s) = 0.1, 0.18, ...): each of these shows in the result.
    'eps_betas_decay': (dict(adam_eps=1e-2, adam_b1=0.8, adam_b2=0.95, ema_decay=0.15,
                             warmup_steps=2), True),
}


# Every case under jit (as the train step runs it); eager on one case (op-by-op is slow).
@pytest.mark.parametrize('case,jit', [(c, True) for c in CASES] + [('paper_ema_warmup', False)])
def test_apply_gradients_matches_reference(case, jit):
    overrides, clip = CASES[case]
    cfg = optim_config(**overrides)
    params = init_params(0)
    grads_seq = random_grads(0)
    history, clipped = reference_run(params, grads_seq, cfg, clip)
    if clip and cfg.grad_clip > 0:
        assert any(clipped) and not all(clipped)  # both branches of the clipping exercised
    if not clip:
        # Clipping would have changed the result, so its absence is observable.
        clipped_history, flags = reference_run(params, grads_seq, cfg, True)
        assert any(flags)
        assert max(float(np.max(np.abs(a - b)))
                   for a, b in zip(clipped_history[-1][0], history[-1][0])) > 100 * TOL

    optimizer = ts.make_optimizer(cfg, clip=clip)
    state = ts.create_train_state(jax.tree.map(jnp.asarray, params), optimizer)

    def update(state, grads):
        return ts.apply_gradients(state, grads, optimizer, cfg)

    if jit:
        update = jax.jit(update)
    for k, grads in enumerate(grads_seq):
        state = update(state, jax.tree.map(jnp.asarray, grads))
        want_params, want_ema = history[k]
        assert int(state.step) == k + 1
        err_p = max_err(state.params, want_params)
        err_e = max_err(state.ema_params, want_ema)
        assert err_p < TOL and err_e < TOL, (k, err_p, err_e)
        if k == 0 and cfg.warmup_steps > 0:
            # The first update has learning rate 0: parameters stay exactly where they were.
            for p, p0 in zip(_leaves(state.params), _leaves(params)):
                np.testing.assert_array_equal(np.asarray(p), p0)
    moved = max(float(np.max(np.abs(np.asarray(p, np.float64) - p0)))
                for p, p0 in zip(_leaves(state.params), _leaves(params)))
    ema_moved = max(float(np.max(np.abs(np.asarray(e, np.float64) - p0)))
                    for e, p0 in zip(_leaves(state.ema_params), _leaves(params)))
    assert moved > 0.1
    if cfg.ema_decay < 0.99 or cfg.ema_warmup:
        assert ema_moved > 0.01  # the EMA visibly follows (and a wrong decay would show)
