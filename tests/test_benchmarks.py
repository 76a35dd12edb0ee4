"""The benchmark harness runs both sides and reports what it promises (no timing asserted)."""

import json

import pytest

from conftest import run_python

pytest.importorskip('torch')
pytest.importorskip('diffusers')


def test_unknown_case_is_named():
    result = run_python(['-m', 'benchmarks.run', '--cases=nope'], check=False)
    assert result.returncode != 0 and "unknown case(s) ['nope']" in result.stderr


def test_profile_groups_thunk_time_by_the_program_op():
    result = run_python(['-m', 'benchmarks.profile', '--case=train_tiny_b16', '--calls=1',
                         '--top=200'])
    lines = result.stdout.splitlines()
    assert lines[0].startswith('train_tiny_b16: ') and 'thunk-seconds over 1 calls' in lines[0]
    rows = [line.split('|', 1)[1].strip() for line in lines[1:]]
    # The forward convolutions and their gradients each appear, blocks merged into one row.
    assert 'jvp(UNet)/X/conv1/conv_general_dilated' in rows
    assert any(row.startswith('transpose(jvp(UNet))/X/conv1/') for row in rows)
    assert not any('down_0_block_0' in row for row in rows)
    shares = [float(line.split('%')[0].split()[-1]) for line in lines[1:]]
    assert shares == sorted(shares, reverse=True) and 95 <= sum(shares) <= 100.5  # (rounded)


def test_gpu_check_runs_small_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py, the script a lent GPU machine runs, in its small mode here:
    every part runs and lands in the JSON (on a GPU: the full unit tier, the main job and the
    CIFAR-10 cases, the peer also under torch.compile)."""
    out = tmp_path / 'check.json'
    run_python(['-m', 'benchmarks.gpu_check', '--small', f'--out={out}'])
    report = json.loads(out.read_text())
    assert report['small'] is True
    assert report['environment']['info']['jax_devices']
    assert report['unit_tier']['returncode'] == 0 and report['unit_tier']['counts']['passed'] > 0
    main_job = report['main_job']
    assert main_job['returncode'] == 0
    assert main_job['sample_metrics']['num_samples'] == 16
    assert main_job['sample_metrics']['fd_mnist5k'] > 0
    # Its benchmark part is the harness's quick run of the smoke cases (`benchmarks.run`), both
    # sides: what the harness reports is checked here rather than in a second run of its own.
    [benchmark] = report['benchmarks'].values()
    assert benchmark['returncode'] == 0, benchmark['stderr_tail']
    results = benchmark['results']
    assert [c['case'] for c in results['cases']] == ['train_tiny_b16', 'sample_tiny_16x20']
    for case in results['cases']:
        assert case['peer_compile'] == 'eager'
        for side in ('ours', 'peer'):
            assert case[side]['min'] <= case[side]['median'] <= case[side]['max']
            assert case[side]['median'] > 0 and case[side]['first_call_s'] > 0
            assert 0 < case[side]['fraction_of_matmul_ceiling'] < 10
        assert case['ratio'] == pytest.approx(case['ours']['median'] / case['peer']['median'])
    assert set(results['matmul_gflops']) == {'torch', 'numpy', 'jax'}
    assert '| train_tiny_b16 | images/s |' in benchmark['stdout_tail']
