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
