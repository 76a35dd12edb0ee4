"""diffusion_jax.aot: the train step and sampler compiled for Cloud TPU slices by libtpu's
compiler on this CPU machine (compile-only devices; no TPU is used)."""

import collections
import json
import re
import types

import jax
import pytest

from conftest import run_python
from configs import tiny
from diffusion_jax import aot
from diffusion_jax import parallel
from diffusion_jax import train

pytest.importorskip('libtpu', reason="the TPU compiler comes with the test extra (Linux x86_64)")


@pytest.mark.parametrize('name, topology, per_host, hosts', [
    ('v2-8', 'v2:2x2', (2, 2, 1), 1), ('v3-32', 'v3:4x4', (2, 2, 1), 4),
    ('v4-8', 'v4:2x2x1', (2, 2, 1), 1), ('v4-32', 'v4:2x2x4', (2, 2, 1), 4),
    ('v4-64', 'v4:2x4x4', (2, 2, 1), 8), ('v5litepod-8', 'v5e:2x4', (2, 4, 1), 1),
    ('v5e-32', 'v5e:4x8', (2, 2, 1), 8), ('v5p-8', 'v5:2x2x1', (2, 2, 1), 1),
    ('v6e-1', 'v6e:1x1', (1, 1, 1), 1)])
def test_parse_slice_lays_out_chips_and_hosts(name, topology, per_host, hosts):
    slice_ = aot.parse_slice(name)
    assert slice_.libtpu_topology == topology
    assert slice_.chips_per_host == per_host
    chips = 1
    for d in slice_.chip_grid:
        chips *= d
    per = per_host[0] * per_host[1] * per_host[2]
    assert chips // per == hosts


@pytest.mark.parametrize('name', ['v3-4', 'v4-12', 'v7-8', 'tpu', 'v5e-0', 'v5e-3'])
def test_unknown_slice_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"unknown TPU slice .*v3-8.*v5e-8.*v6e-8"):
        aot.parse_slice(name)


def test_collectives_are_counted_once_per_instruction_with_their_result_bytes():
    hlo = '\n'.join([
        '%ar = f32[128,256]{1,0} all-reduce(f32[128,256]{1,0} %g), replica_groups={}',
        '%ars = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce-start(%a, %b), replica_groups={}',
        '%ard = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce-done(%ars)',
        '%ags = (f32[16]{0}, f32[128]{0}) all-gather-start(f32[16]{0} %p), dimensions={0}',
        '%agd = f32[128]{0} all-gather-done(%ags)',
        '%rs = f32[16,3]{1,0} reduce-scatter(f32[128,3]{1,0} %g), dimensions={0}',
        '%add = f32[4]{0} add(%x, %y)'])
    assert aot.collectives(hlo) == {
        'all-reduce': {'count': 2, 'bytes': 128 * 256 * 4 + 40 + 32},
        'all-gather': {'count': 1, 'bytes': 128 * 4},
        'reduce-scatter': {'count': 1, 'bytes': 16 * 3 * 4}}


class _FakeCompiled:
    def __init__(self, cost, temp_bytes=3 * 2 ** 30):
        self._cost = cost
        self._temp = temp_bytes

    def memory_analysis(self):
        return types.SimpleNamespace(argument_size_in_bytes=2 ** 30, output_size_in_bytes=2 ** 30,
                                     alias_size_in_bytes=2 ** 30, temp_size_in_bytes=self._temp,
                                     generated_code_size_in_bytes=0)

    def cost_analysis(self):
        return self._cost

    def as_text(self):
        return ''


@pytest.mark.parametrize('optimal', [-408.0, 0.0, float('nan'), float('inf'), None])
def test_an_estimate_that_is_not_finite_and_positive_is_reported_unknown(optimal):
    cost = {'flops': 1e12, 'bytes accessed': 2e9}
    if optimal is not None:
        cost['optimal_seconds'] = optimal
    figures = aot.program_figures(_FakeCompiled(cost), hbm_gib=16.0)
    assert figures['optimal_seconds'] is None
    assert figures['flops'] == 1e12 and figures['bytes_accessed'] == 2e9
    # Donated arguments are counted once: 1 GiB of arguments, their aliased outputs, 3 GiB temp.
    assert figures['total_gib'] == pytest.approx(4.0) and figures['fits']


def test_a_program_that_does_not_fit_names_its_need_the_capacity_and_the_levers():
    figures = aot.program_figures(_FakeCompiled({}, temp_bytes=20 * 2 ** 30), hbm_gib=16.0)
    assert not figures['fits']
    report = {'topology': 'v5e-8', 'device_kind': 'TPU v5 lite', 'hbm_per_device_gib': 16.0,
              'train': figures, 'sample': None}
    with pytest.raises(aot.DoesNotFit, match=r'train program needs 21\.00 GiB per device.*'
                       r'has 16 GiB.*bfloat16.*param_sharding.*num_microbatches'):
        aot.check_fits(report)


def _tiny(**model):
    config = tiny.get_config()
    with config.unlocked():
        config.model.update(model)
    return config


def _compiled_ops(config, mesh):
    """{opcode: count} of the config's train step compiled for `mesh`'s devices."""
    compiled, _ = aot.compile_train_step(config, mesh)
    return collections.Counter(re.findall(r'= \S+ ([a-z][a-z0-9\-]*)\(', compiled.as_text()))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_auto_convolutions_follow_the_platform_the_program_is_compiled_for(dtype):
    """64-channel layers, where 'auto' takes the CPU's matmul convolutions on the CPU: compiled
    for a TPU, 'auto' gives the very program of XLA's convolutions (the same instructions,
    convolutions, dots, loops and custom calls alike), while on the CPU it does not."""
    tpu_mesh = parallel.make_mesh(aot.topology_devices(aot.parse_slice('v5e-8')))
    cpu_mesh = parallel.make_mesh(jax.devices()[:1])
    meshes = {'tpu': tpu_mesh, 'cpu': cpu_mesh}
    ops = {}
    for backward in ('auto', 'xla'):
        config = _tiny(ch=64, ch_mult=(1,), attn_resolutions=(), num_groups=8, dtype=dtype,
                       conv_backward=backward)
        for platform, mesh in meshes.items():
            ops[backward, platform] = _compiled_ops(config, mesh)
    assert ops['auto', 'tpu'] == ops['xla', 'tpu']
    assert ops['auto', 'tpu']['convolution'] > 0
    assert ops['auto', 'cpu'] != ops['xla', 'cpu']
    assert ops['auto', 'cpu']['convolution'] < ops['xla', 'cpu']['convolution']


def test_sampler_costs_are_one_reverse_step_whatever_the_chunk():
    """XLA's cost analysis counts a loop body once: a 5-step chunk costs what a 1-step one
    does (within the loop's own bookkeeping), so the report's figures are per reverse step."""
    mesh = parallel.make_mesh(aot.topology_devices(aot.parse_slice('v5e-8')))
    flops = {}
    for chunk in (1, 5):
        config = tiny.get_config()
        config.sampling.chunk_size = chunk
        flops[chunk] = aot.compile_sampler_chunk(config, mesh)[0].cost_analysis()['flops']
    assert flops[5] == pytest.approx(flops[1], rel=0.05)


def _aot_cli(*args):
    return ['-m', 'diffusion_jax.aot', '--config=configs/tiny.py', *args]


def test_cli_writes_the_table_and_the_json_for_a_megacore_slice(tmp_path):
    """v4-8 as JAX sees it: 4 devices of 2 TensorCores, one host; the gradient is all-reduced
    (about its own bytes), and both programs fit."""
    path = tmp_path / 'out.json'
    result = run_python(_aot_cli('--topology=v4-8', f'--json={path}'), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'v4-8: 4 x TPU v4 (2 core(s) per device, 1 host(s), 32 GiB' in result.stdout
    assert 'collectives:' in result.stdout
    report = json.loads(path.read_text())
    assert {'topology', 'device_kind', 'num_devices', 'hbm_per_device_gib', 'train', 'sample',
            'units'} <= set(report)
    assert (report['topology'], report['num_devices'], report['cores_per_device'],
            report['num_hosts'], report['hbm_per_device_gib']) == ('v4-8', 4, 2, 1, 32.0)
    for name in ('train', 'sample'):
        figures = report[name]
        assert {'argument_gib', 'temp_gib', 'total_gib', 'fits', 'flops', 'bytes_accessed',
                'optimal_seconds', 'collectives'} <= set(figures)
        assert figures['fits'] is True and figures['flops'] > 0
        assert 0 < figures['total_gib'] < 1  # GiB, not bytes.
    train_figures, sample = report['train'], report['sample']
    assert train_figures['steps_per_second'] is None or train_figures['steps_per_second'] > 0
    assert sample['images_per_second'] is None or sample['images_per_second'] > 0
    assert (sample['steps_per_sample'], sample['steps_per_chunk']) == (20, 5)
    config = tiny.get_config()
    grad_bytes = 4 * sum(x.size for x in jax.tree.leaves(jax.eval_shape(
        lambda: train.init_params(train.make_model(config), config, jax.random.key(0)))))
    reduced = sum(train_figures['collectives'].get(k, {}).get('bytes', 0)
                  for k in ('all-reduce', 'reduce-scatter'))
    # About one all-reduce of the gradient (a few small leaves may travel folded into others).
    assert 0.95 * grad_bytes <= reduced < 2 * grad_bytes


def test_cli_a_config_that_does_not_fit_exits_naming_need_and_capacity(tmp_path):
    result = run_python(_aot_cli('--topology=v5e-8', '--config.data.image_size=256',
                                 '--config.training.batch_size=4096',
                                 '--config.sampling.batch_size=8'), check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(error) == 1
    # Far over the chip's memory, the compiler refuses the program and says what it needed.
    assert 'does not fit on v5e-8: the train program does not compile:' in error[0]
    assert 'exceeds available HBM' in error[0]
    assert 'has 16 GiB' in error[0] and 'num_microbatches' in error[0]
    assert 'Traceback' not in result.stderr


def test_cli_unknown_slice_lists_the_valid_ones(tmp_path):
    result = run_python(_aot_cli('--topology=v9-8'), check=False)
    assert result.returncode == 2
    assert "error: unknown TPU slice 'v9-8'; valid:" in result.stderr
    assert 'Traceback' not in result.stderr


def test_libtpu_installed_does_not_make_auto_join_a_cluster(monkeypatch):
    """--distributed=auto joins a cluster on a TPU VM (chips attached), not wherever libtpu is
    installed (as here, for the compiler)."""
    from diffusion_jax import distributed

    def no_cluster(**kwargs):
        raise AssertionError('jax.distributed.initialize must not be called here')
    monkeypatch.setattr(jax.distributed, 'initialize', no_cluster)
    monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
    assert not distributed.tpu_chips_attached()
    assert distributed.initialize('auto') is False
    monkeypatch.setattr(distributed, 'tpu_chips_attached', lambda: True)
    with pytest.raises(AssertionError, match='must not be called'):
        distributed.initialize('auto')
