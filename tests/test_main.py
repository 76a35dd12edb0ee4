"""The entry point's machine probing."""

import os

from diffusion_jax import main


def test_available_cores_follows_the_affinity_mask_or_falls_back(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 3, 5}, raising=False)
    assert main.available_cores() == 3
    monkeypatch.delattr(os, 'sched_getaffinity')  # macOS has no affinity call.
    monkeypatch.setattr(os, 'cpu_count', lambda: 6)
    assert main.available_cores() == 6
    monkeypatch.setattr(os, 'cpu_count', lambda: None)
    assert main.available_cores() == 1


def test_cpu_backend_schedules_in_order_unless_the_user_chose(monkeypatch):
    # cpu_devices=0 leaves the device count alone, so this runs after JAX has started.
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_use_xnnpack=false')
    main.configure_cpu_backend(None, 0, fast_math=True)
    flags = os.environ['XLA_FLAGS'].split()
    assert flags == ['--xla_cpu_use_xnnpack=false', '--xla_cpu_enable_fast_math=true',
                     main.SEQUENTIAL_SCHEDULER_FLAG]
    chosen = '--xla_cpu_enable_concurrency_optimized_scheduler=true'
    monkeypatch.setenv('XLA_FLAGS', chosen)
    main.configure_cpu_backend(None, 0, fast_math=False)
    assert os.environ['XLA_FLAGS'] == chosen
