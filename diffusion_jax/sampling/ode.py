"""The probability flow ODE (Song et al. 2021, eq. 13), solved on device with diffrax:

  dx/dt = f(x, t) - ½ g(t)² s_θ(x, t),

whose trajectories carry the SDE's marginals p_t. Integrated from t = 1 down to ε it is a
deterministic sampler; from ε up to 1 it encodes data into the latent x(1); augmented with the
divergence of its right-hand side it gives exact log-likelihoods (evaluation/ode_likelihood.py).

The step size is adaptive (PID controller on the RMS error over the whole batch, `rtol`, `atol`);
Song et al. use RK45 with rtol = atol = 1e-5. Tsit5 is the default solver (the same order, with
better error coefficients); 'dopri5' is RK45's Dormand-Prince pair.
"""

import functools

import jax
import jax.numpy as jnp

from diffusion_jax import sde as sde_lib
from diffusion_jax.sampling import pc

# Our solver names -> diffrax's class names. diffrax is imported where an ODE is solved: it
# costs most of a second at every start of the CLI, and only the score-SDE code uses it.
SOLVERS = {'tsit5': 'Tsit5', 'dopri5': 'Dopri5', 'dopri8': 'Dopri8', 'heun': 'Heun'}


def probability_flow_drift(model_apply, params, sde, x, t_scalar):
    """The right-hand side of eq. 13 at a scalar time."""
    t = jnp.full((x.shape[0],), t_scalar, jnp.float32)
    score = sde_lib.score(model_apply, params, sde, x, t)
    return sde.reverse(score, x, t, probability_flow=True)[0]


def solve(vector_field, y0, t0, t1, *, rtol, atol, solver='tsit5', max_steps=4096):
    """Integrates dy/dt = vector_field(t, y) from t0 to t1 (either direction).

    Returns:
      (y(t1), number of accepted + rejected solver steps).
    """
    if solver not in SOLVERS:
        raise ValueError(f'Unknown ODE solver {solver!r}; valid: {", ".join(SOLVERS)}')
    import diffrax
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(t, y)),
        getattr(diffrax, SOLVERS[solver])(),
        t0=t0, t1=t1, dt0=None, y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps)
    return jax.tree.map(lambda y: y[-1], sol.ys), sol.stats['num_steps']


@functools.partial(jax.jit, static_argnames=('model_apply', 'sde', 'rtol', 'atol', 'solver',
                                             'denoise'))
def ode_sample_from(model_apply, params, sde, x_T, *, rtol=1e-5, atol=1e-5, solver='tsit5',
                    denoise=True):
    """Solves the ODE from x(1) = x_T down to t = ε: (x(ε), solver steps).

    With `denoise`, x(ε) gets the noise-free reverse-diffusion step at t = ε (Song et al.)."""
    drift = functools.partial(probability_flow_drift, model_apply, params, sde)
    x, num_steps = solve(lambda t, x: drift(x, t), x_T, sde.T, sde.sample_eps, rtol=rtol,
                         atol=atol, solver=solver)
    if denoise:
        t = jnp.full((x.shape[0],), sde.sample_eps, jnp.float32)
        score = sde_lib.score(model_apply, params, sde, x, t)
        _, x = pc.predictor_step('reverse_diffusion', sde, score, x, t, jnp.zeros_like(x))
    return x, num_steps


def ode_sample(model_apply, params, sde, rng, shape, *, rtol=1e-5, atol=1e-5, solver='tsit5',
               denoise=True, sharding=None):
    """Samples x_T from the prior (fold_in(rng, N), as the PC sampler) and solves the ODE.

    Returns:
      (x, float32 [B, H, W, C]; the number of solver steps).
    """
    x_T = sde.prior_sampling(jax.random.fold_in(rng, sde.N), shape)
    if sharding is not None:
        x_T = jax.device_put(x_T, sharding)
    return ode_sample_from(model_apply, params, sde, x_T, rtol=rtol, atol=atol, solver=solver,
                           denoise=denoise)


@functools.partial(jax.jit, static_argnames=('model_apply', 'sde', 'rtol', 'atol', 'solver'))
def ode_encode(model_apply, params, sde, x, *, rtol=1e-5, atol=1e-5, solver='tsit5'):
    """The latent x(1) of data x = x(ε), by solving the ODE forward: (latent, solver steps).

    `ode_sample_from(..., latent, denoise=False)` maps it back to x up to the tolerances."""
    drift = functools.partial(probability_flow_drift, model_apply, params, sde)
    return solve(lambda t, x: drift(x, t), x, sde.sample_eps, sde.T, rtol=rtol, atol=atol,
                 solver=solver)
