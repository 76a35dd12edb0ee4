"""Ahead-of-time compilation for a Cloud TPU slice, on a machine without one (a preflight).

    python -m diffusion_jax.aot --config=configs/cifar10.py --topology=v3-8 [--json=out.json] \
        [--config.training.batch_size=256 ...]

libtpu's compiler builds the config's real train step and one jitted chunk of its sampler for the
slice's devices (`jax.experimental.topologies`, the running backend being the CPU): the same
mesh, sharding rules and kernels a run on that slice would use, and nothing is allocated. The
compiled programs report what a chip needs (arguments and XLA's temporaries), the FLOPs and HBM
bytes per step, the compiler's own time estimate and the collectives that cross the interconnect.
A config that does not fit stops with the figures and the levers that shrink it.

Every figure is the compiler's, per device as JAX sees it on that slice (one TensorCore on v2 and
v3; one megacore chip of two TensorCores on v4 and v5p; one chip on v5e and v6e); no TPU ran it.
Needs libtpu (`pip install -e '.[tpu]'`; the test extra brings it too), Linux x86_64.
"""

import collections
import contextlib
import json
import math
import os
import re
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import checkpointing
from diffusion_jax import errors
from diffusion_jax import parallel
from diffusion_jax import sampling
from diffusion_jax import train
from diffusion_jax import train_state as train_state_lib
from diffusion_jax.sampling import ancestral
from diffusion_jax.sampling import configured
from diffusion_jax.sampling import ddim
from diffusion_jax.sampling import langevin
from diffusion_jax.sampling import pc


class Generation(NamedTuple):
    """A Cloud TPU generation as libtpu names it and as JAX sees its chips."""
    libtpu_name: str
    chip_config: str  # 'default': a device per TensorCore or single-core chip | 'megacore'.
    cores_per_chip: int  # What the N of 'vX-N' counts per chip (TensorCores; v5e/v6e: chips).
    grid_dims: int  # 2-D or 3-D (twisted tori) chip grids.
    hbm_gib: float  # HBM per JAX device.


# Published capacities: v2 16 GiB and v3 32 GiB per chip of two TensorCores, each core its own
# JAX device; v4 32 GiB and v5p 95 GiB per megacore chip (one device of two cores); v5e 16 GiB
# and v6e 32 GiB per single-core chip. A host holds 4 chips (8 for v5e-8 and v6e-8).
GENERATIONS = {
    'v2': Generation('v2', 'default', 2, 2, 8.0),
    'v3': Generation('v3', 'default', 2, 2, 16.0),
    'v4': Generation('v4', 'megacore', 2, 3, 32.0),
    'v5p': Generation('v5', 'megacore', 2, 3, 95.0),
    'v5e': Generation('v5e', 'default', 1, 2, 16.0),
    'v6e': Generation('v6e', 'default', 1, 2, 32.0),
}
ALIASES = {'v5litepod': 'v5e', 'v6lite': 'v6e'}
MAX_CHIPS = 4096
# The slices docs/tpu.md tabulates; any 'generation-N' above compiles.
DOCUMENTED_SLICES = ('v3-8', 'v4-8', 'v5e-8', 'v5p-8', 'v6e-8')


class Slice(NamedTuple):
    name: str
    generation: Generation
    chip_grid: tuple[int, ...]
    chips_per_host: tuple[int, int, int]

    @property
    def libtpu_topology(self):
        return f"{self.generation.libtpu_name}:{'x'.join(map(str, self.chip_grid))}"


def parse_slice(name):
    """The Slice of a Cloud TPU accelerator type such as 'v3-8', 'v4-32' or 'v5litepod-16'.

    Chip grids grow as Cloud TPU's do: 2-D grids double their shorter side (v5e-8 is 2x4,
    v5e-32 4x8), 3-D ones double their smallest axis, the last on ties (v4-8 2x2x1, v4-32
    2x2x4, v4-64 4x4x4).
    """
    generation, _, count = str(name).partition('-')
    generation = ALIASES.get(generation, generation)
    spec = GENERATIONS.get(generation)
    chips = int(count) // spec.cores_per_chip if spec and count.isdigit() else 0
    valid_chips = chips and chips & (chips - 1) == 0 and chips <= MAX_CHIPS and (
        chips * spec.cores_per_chip == int(count)) and (spec.cores_per_chip == 1 or chips >= 4)
    if not valid_chips:
        raise ValueError(
            f'unknown TPU slice {name!r}; valid: GENERATION-N with GENERATION one of '
            f'{", ".join(list(GENERATIONS) + list(ALIASES))} and N a power of two counting '
            'TensorCores (v2, v3, v4, v5p: 8, 16, 32, ...) or chips (v5e, v6e: 1, 4, 8, ...), '
            f'e.g. {", ".join(("v2-8", "v3-8", "v3-32", "v4-8", "v4-32", "v5e-8", "v5p-8"))}, '
            'v6e-8')
    grid = [1] * spec.grid_dims if spec.grid_dims == 2 else [2, 2, 1]
    while math.prod(grid) < chips:
        smallest = min(grid)
        last = max(i for i, d in enumerate(grid) if d == smallest)
        grid[last] *= 2
    if spec.cores_per_chip == 1 and chips <= 8:
        per_host = (*grid, 1)[:3] if len(grid) == 2 else tuple(grid)
    else:
        per_host = (2, 2, 1) if chips >= 4 else (*grid, 1)[:3]
    return Slice(f'{generation}-{count}', spec, tuple(grid), tuple(per_host))


GIB = 2.0 ** 30
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
# Sampler chunks compiled here: the reverse-step scans of the ancestral, DDIM, predictor-corrector
# and annealed Langevin samplers. The ODE sampler's adaptive solve has no fixed step to cost.
AOT_SAMPLERS = ('ancestral', 'ddim', 'pc', 'langevin')


class DoesNotFit(errors.UserError):
    """The program needs more memory per device than the slice's chips have."""


def _prepare_tpu_compiler(platforms=True):
    """Compile-only TPU devices without TPU hardware: skip the TPU VM's metadata server, one
    local worker, no lock on libtpu (it guards chips, and several processes may compile at
    once), and (`platforms`, before JAX starts a backend) the CPU as the running backend, so
    that libtpu does not look for chips. Values the user set win."""
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    if platforms and not os.environ.get('JAX_PLATFORMS'):
        jax.config.update('jax_platforms', 'cpu')


def topology_devices(slice_):
    """The compile-only TPU devices of a `Slice`."""
    _prepare_tpu_compiler(platforms=False)
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(
            slice_.libtpu_topology, platform='tpu', chip_config_name=slice_.generation.chip_config,
            chips_per_host_bounds=slice_.chips_per_host).devices
    except (ImportError, RuntimeError) as e:
        raise RuntimeError(f'cannot describe a {slice_.name} for the TPU compiler ({e}); it '
                           "needs libtpu: pip install -e '.[tpu]' (Linux x86_64)") from e


def _abstract(tree, sharding):
    """ShapeDtypeStructs of a tree of arrays, each with `sharding`."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding),
                        tree)


def _timed_compile(lowered):
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def compile_train_step(config, mesh):
    """(compiled train step, compile seconds) for `config` on `mesh`, as `train` builds it."""
    parallel.check_global_batch(config.training.batch_size, mesh, config.training.num_microbatches)
    diffusion = train.make_diffusion(config.diffusion)
    model = train.make_model(config)
    optimizer = train_state_lib.make_optimizer(config.optim,
                                               clip=not config.training.clip_per_replica)
    state, shardings = abstract_state(config, model, optimizer, mesh)
    shape = (config.training.batch_size, config.data.image_size, config.data.image_size,
             config.data.channels)
    batch = {'image': jax.ShapeDtypeStruct(shape, jnp.float32,
                                           sharding=parallel.data_sharded(mesh)),
             'label': jax.ShapeDtypeStruct(shape[:1], jnp.int32,
                                           sharding=parallel.data_sharded(mesh))}
    rng = _abstract(jax.random.key(0), parallel.replicated(mesh))
    step = train.build_step(config, model, diffusion, optimizer, mesh, shardings)
    return _timed_compile(step.lower(state, batch, rng))


def abstract_state(config, model, optimizer, mesh):
    """(the train state as sharded ShapeDtypeStructs, its shardings), as `train` lays it out."""
    def init(rng):
        return train_state_lib.create_train_state(train.init_params(model, config, rng),
                                                  optimizer)
    shapes = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.state_shardings(shapes, mesh, rules=config.training.param_sharding)
    return checkpointing.abstract_with_shardings(shapes, shardings), shardings


def compile_sampler_chunk(config, mesh):
    """The configured sampler's jitted chunk of `sampling.chunk_size` reverse steps over one
    sampling batch, as `train.sample_images` runs it.

    Returns:
      (compiled chunk, compile seconds, reverse steps in the chunk, reverse steps per sample,
      network evaluations per step, images per batch), or None for a sampler with no fixed
      step (ode) or a guided one (classifier guidance reads a trained classifier's workdir).
    """
    s = config.sampling
    if s.sampler not in AOT_SAMPLERS or s.guidance == 'classifier':
        return None
    process = train.make_diffusion(config.diffusion)
    sampling.check_sampling_config(s, process)
    model = train.make_model(config)
    sampler = train.make_sampler(config, model, process, mesh)
    optimizer = train_state_lib.make_optimizer(config.optim)
    state, _ = abstract_state(config, model, optimizer, mesh)
    replicated = parallel.replicated(mesh)
    batch_size = min(s.batch_size, s.num_samples) if s.num_samples else s.batch_size
    x_sharding = (parallel.data_sharded(mesh) if batch_size % mesh.devices.size == 0
                  else replicated)
    shape = (batch_size, config.data.image_size, config.data.image_size, config.data.channels)
    x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=x_sharding)
    bundle = dict(params=state.ema_params,
                  labels=jax.ShapeDtypeStruct(shape[:1], jnp.int32, sharding=replicated),
                  guidance_scale=jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated))
    rng = _abstract(jax.random.key(0), replicated)
    first = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    evaluations = 2 if s.guidance == 'classifier_free' else 1
    if s.sampler == 'ancestral':
        total = process.num_timesteps
        chunk = min(s.chunk_size or total, total)
        lowered = ancestral.reverse_steps.lower(
            sampler.model_apply, bundle, _abstract(process, replicated), x, rng, first,
            num_steps=chunk, clip_denoised=s.clip_denoised)
    elif s.sampler == 'ddim':
        total = s.num_steps
        chunk = min(configured.ddim_chunk_size(s, process.num_timesteps), total)
        steps = dict(t=jax.ShapeDtypeStruct((chunk,), jnp.int32, sharding=replicated),
                     **{k: jax.ShapeDtypeStruct((chunk,), jnp.float32, sharding=replicated)
                        for k in ('sqrt_alpha_bar_to', 'eps_coef', 'sigma')})
        lowered = ddim.ddim_steps.lower(sampler.model_apply, bundle,
                                        _abstract(process, replicated), x, rng, steps,
                                        clip_denoised=s.clip_denoised)
    elif s.sampler == 'pc':
        total = process.N
        chunk = min(s.chunk_size or total, total)
        evaluations *= (s.predictor != 'none') + (s.n_corrector if s.corrector != 'none' else 0)
        lowered = pc.pc_steps.lower(
            sampler.model_apply, bundle, process, x, rng, first, num_steps=chunk,
            predictor=s.predictor, corrector=s.corrector, n_corrector=s.n_corrector, snr=s.snr)
    else:
        total = process.num_scales * s.n_steps_each
        chunk = min(s.chunk_size or total, total)
        lowered = langevin.langevin_steps.lower(
            sampler.model_apply, bundle, process, x, rng, first, num_steps=chunk,
            n_steps_each=s.n_steps_each, step_lr=s.step_lr)
    compiled, seconds = _timed_compile(lowered)
    return compiled, seconds, chunk, total, evaluations, batch_size


def collectives(hlo_text):
    """{kind: {'count', 'bytes'}} of the collectives in a compiled HLO module's text.

    Counts each instruction once where it appears (an asynchronous pair by its '-start'); bytes
    are its result's, per device (for an asynchronous all-gather or permute, the gathered half
    of the (operands, results) tuple). A collective inside a loop body runs once per iteration,
    which a static count cannot show.
    """
    found = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})
    pattern = re.compile(r'=\s*(\(.*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
    for line in hlo_text.splitlines():
        match = pattern.search(line)
        if not match:
            continue
        result, kind, is_start = match.groups()
        sizes = [_array_bytes(dtype, dims) for dtype, dims in
                 re.findall(r'([a-z]+[0-9]*)\[([0-9,]*)\]', result)]
        if is_start and kind in ('all-gather', 'collective-permute') and len(sizes) > 1:
            sizes = sizes[len(sizes) // 2:]
        found[kind]['count'] += 1
        found[kind]['bytes'] += sum(sizes)
    return dict(found)


_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}


def _array_bytes(dtype, dims):
    size = math.prod(int(d) for d in dims.split(',') if d)
    return size * _DTYPE_BYTES.get(dtype, 0)


def _finite_positive(value):
    return value if value is not None and math.isfinite(value) and value > 0 else None


def program_figures(compiled, hbm_gib, loop_costs_known=True):
    """What one compiled program needs per device: memory (GiB), FLOPs, HBM bytes, the
    compiler's time estimate and the collectives.

    XLA's cost analysis counts a loop's body once, whatever its trip count (tested): a sampler
    chunk's FLOPs, bytes and time are one reverse step's. Where a loop runs a part of the step
    several times (gradient accumulation), `loop_costs_known=False` reports them as None; so is
    an `optimal_seconds` that is not finite and positive (the compiler's estimate failed).
    """
    memory = compiled.memory_analysis()
    argument = memory.argument_size_in_bytes / GIB
    output = (memory.output_size_in_bytes - memory.alias_size_in_bytes) / GIB
    temp = memory.temp_size_in_bytes / GIB
    total = argument + output + temp + memory.generated_code_size_in_bytes / GIB
    cost = compiled.cost_analysis() or {}
    known = {key: _finite_positive(cost.get(key)) if loop_costs_known else None
             for key in ('flops', 'bytes accessed', 'optimal_seconds')}
    text = compiled.as_text()
    return {
        'argument_gib': argument, 'output_gib': output, 'temp_gib': temp, 'total_gib': total,
        'fits': total <= hbm_gib, 'flops': known['flops'],
        'bytes_accessed': known['bytes accessed'], 'optimal_seconds': known['optimal_seconds'],
        'compiler_optimal_seconds': cost.get('optimal_seconds'),  # As given, even if absurd.
        'collectives': collectives(text),
        'custom_calls': dict(collections.Counter(
            re.findall(r'custom_call_target="([^"]+)"', text))),
    }


def preflight(config, slice_name):
    """The report of `config` compiled for `slice_name`: a JSON-ready dict (see the module
    docstring); `check_fits` raises when it does not fit."""
    slice_ = parse_slice(slice_name)
    devices = topology_devices(slice_)
    hbm_gib = slice_.generation.hbm_gib
    mesh = parallel.make_mesh(devices)
    report = {
        'topology': slice_.name, 'libtpu_topology': slice_.libtpu_topology,
        'device_kind': devices[0].device_kind, 'num_devices': len(devices),
        'num_hosts': len({d.process_index for d in devices}),
        'cores_per_device': getattr(devices[0], 'num_cores', 1),
        'hbm_per_device_gib': hbm_gib,
        'precision': f'{config.model.dtype} compute, {config.model.param_dtype} parameters',
        'parallel': config.training.parallel,
        'param_sharding': [list(rule) for rule in config.training.param_sharding],
        'num_microbatches': config.training.num_microbatches,
        'global_batch': config.training.batch_size, 'sampler': config.sampling.sampler,
        'units': {'*_gib': 'GiB per device', 'flops': 'per device and step',
                  'bytes_accessed': 'HBM bytes per device and step',
                  'optimal_seconds': "the compiler's estimate per step (None: unknown)",
                  'sample': 'flops, bytes_accessed, optimal_seconds per reverse step',
                  'collectives': 'per device: result bytes, static count in the program'},
    }
    with _out_of_memory_as_does_not_fit(report, 'train'):
        compiled, seconds = compile_train_step(config, mesh)
    figures = program_figures(compiled, hbm_gib,
                              loop_costs_known=config.training.num_microbatches == 1)
    figures.update(compile_seconds=seconds,
                   steps_per_second=figures['optimal_seconds'] and 1 / figures['optimal_seconds'])
    report['train'] = figures
    report['sample'] = None
    with _out_of_memory_as_does_not_fit(report, 'sample'):
        chunk = compile_sampler_chunk(config, mesh)
    if chunk is not None:
        compiled, seconds, steps, total, evaluations, batch = chunk
        figures = program_figures(compiled, hbm_gib)
        step_seconds = figures['optimal_seconds']
        figures.update(
            compile_seconds=seconds, sampler=config.sampling.sampler, batch_size=batch,
            steps_per_chunk=steps, steps_per_sample=total, evaluations_per_step=evaluations,
            seconds_per_batch=step_seconds and step_seconds * total,
            images_per_second=step_seconds and batch / (step_seconds * total))
        report['sample'] = figures
    return report


@contextlib.contextmanager
def _out_of_memory_as_does_not_fit(report, name):
    """The TPU compiler refuses a program far over the chip's memory (RESOURCE_EXHAUSTED) rather
    than report its size: DoesNotFit with the compiler's own figures."""
    try:
        yield
    except Exception as e:  # jax.errors.JaxRuntimeError; its type has moved between versions.
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        said = re.sub(r'^.*?RESOURCE_EXHAUSTED:\s*', '', str(e).splitlines()[0])
        raise DoesNotFit(does_not_fit_message(
            report, [f'the {name} program does not compile: "{said}"'])) from None


def check_fits(report):
    """Raises DoesNotFit naming what a device needs, what it has and the levers."""
    needs = [f"the {name} program needs {f['total_gib']:.2f} GiB per device "
             f"({f['argument_gib']:.2f} arguments + {f['temp_gib']:.2f} temporaries)"
             for name, f in ((n, report[n]) for n in ('train', 'sample'))
             if f and not f['fits']]
    if needs:
        raise DoesNotFit(does_not_fit_message(report, needs))


def does_not_fit_message(report, needs):
    return (f"does not fit on {report['topology']}: {'; '.join(needs)}, and a "
            f"{report['device_kind']} device has {report['hbm_per_device_gib']:g} GiB. Levers: "
            '--config.model.dtype=bfloat16 (the bf16 policy), '
            '--config.training.param_sharding (FSDP: parallel.FSDP_RULES), '
            '--config.training.num_microbatches=K (gradient accumulation), '
            'a smaller --config.sampling.batch_size, or a larger slice')


def format_table(report):
    """The report as a few aligned lines for a terminal."""
    lines = [f"{report['topology']}: {report['num_devices']} x {report['device_kind']} "
             f"({report['cores_per_device']} core(s) per device, {report['num_hosts']} host(s), "
             f"{report['hbm_per_device_gib']:g} GiB HBM each); {report['precision']}; "
             f"parallel={report['parallel']}, global batch {report['global_batch']}"]
    header = (f"{'program':<8} {'args GiB':>9} {'temp GiB':>9} {'total GiB':>10} {'fits':>5} "
              f"{'TFLOP':>8} {'HBM GB':>8} {'est. ms':>9} {'rate':>16} {'compile s':>10}")
    lines.append(header)
    for name, unit in (('train', 'steps/s'), ('sample', 'images/s')):
        f = report[name]
        if f is None:
            lines.append(f"{name:<8} not compiled: the {report['sampler']} sampler has no "
                         'fixed reverse step, or classifier guidance needs a trained classifier')
            continue
        rate = f['steps_per_second'] if name == 'train' else f['images_per_second']
        lines.append(
            f"{name:<8} {f['argument_gib']:>9.3f} {f['temp_gib']:>9.3f} {f['total_gib']:>10.3f} "
            f"{'yes' if f['fits'] else 'NO':>5} {_fmt(f['flops'], 1e12, 3):>8} "
            f"{_fmt(f['bytes_accessed'], 1e9, 2):>8} {_fmt(f['optimal_seconds'], 1e-3, 2):>9} "
            f"{_fmt(rate, 1, 1) + ' ' + unit:>16} {f['compile_seconds']:>10.1f}")
        comm = ', '.join(f"{k} x{v['count']} ({v['bytes'] / 1e6:.1f} MB)"
                         for k, v in sorted(f['collectives'].items())) or 'none'
        lines.append(f'         collectives: {comm}')
    lines.append("Figures per device, from libtpu's compiler (no TPU ran them); est. ms is its "
                 "own estimate ('?': it gave none that is finite and positive). The sampler's "
                 'TFLOP, HBM GB and est. ms are per reverse step of its batch, its rate for the '
                 'whole batch over all steps.')
    return '\n'.join(lines)


def _fmt(value, scale, digits):
    return '?' if value is None else f'{value / scale:.{digits}f}'


def main(argv):
    """Prints the table (and writes the JSON); a user error or a program that does not fit ends
    with one `error:` line and status 2."""
    from absl import flags

    if len(argv) > 1:
        _fail(f'unexpected arguments {argv[1:]}')
    config, slice_name, json_path = flags.FLAGS.config, flags.FLAGS.topology, flags.FLAGS.json
    try:
        report = preflight(config, slice_name)
    except (ValueError, RuntimeError, DoesNotFit) as e:  # A bad slice or config, no libtpu.
        _fail(e)
    print(format_table(report))
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(report, f, indent=2, sort_keys=True)
    try:
        check_fits(report)
    except DoesNotFit as e:
        _fail(e)


def _fail(message):
    from diffusion_jax import config_cli
    config_cli.fail(message)


def _define_flags():
    from absl import flags
    flags.DEFINE_string('topology', None, 'The Cloud TPU slice to compile for, as its '
                        'accelerator type: v3-8, v4-32, v5litepod-16, ...')
    flags.DEFINE_string('json', None, 'Also write the report here, as one JSON object.')
    flags.mark_flag_as_required('topology')


if __name__ == '__main__':
    from diffusion_jax import config_cli
    _define_flags()
    _prepare_tpu_compiler()
    config_cli.run(main, required=('config',))
