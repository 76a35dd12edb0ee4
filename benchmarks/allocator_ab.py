"""The allocator A/B: the harness under glibc's default malloc and under
`diffusion_jax.allocator`'s malloc, at both sizes (MNIST and CIFAR-10 U-Nets), training and
sampling, ours and diffusers side by side; the table goes to docs/benchmarks.md.

    python -m benchmarks.allocator_ab [--pairs=2]   # about 15 minutes a pair on 2 cores; idle

Pair by pair: each pair runs the harness once under each setting, the first pair default
first, the next the other way round, so a machine that slows or speeds up during the run
weighs on both settings alike; each setting's rate is the median over its runs, and the table
gives the allocator's speed-up in every pair. Each run is one `python -m benchmarks.run`
process (`DIFFUSION_JAX_ALLOCATOR=default` for the default), so the loader reads the settings at
start-up as in a user's run. Per side: throughput, minor page faults and system time per unit
(image or image-step, from getrusage around that side's timed rounds, the first of which
holds any one-time growth of the heap), and the peak RSS of a child process.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from diffusion_jax import allocator

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ('train_mnist_b32', 'train_cifar10_b32', 'sample_mnist_16x1000', 'sample_cifar10_16x20')
SETTINGS = {'glibc default': {'DIFFUSION_JAX_ALLOCATOR': 'default'},
            'diffusion_jax.allocator': {}}
START, END = '<!-- allocator_ab:start -->', '<!-- allocator_ab:end -->'


def run_harness(extra_env, json_path):
    env = {**allocator.without_allocator(os.environ), **extra_env}
    subprocess.run([sys.executable, '-m', 'benchmarks.run', f'--cases={",".join(CASES)}',
                    f'--json={json_path}'], cwd=ROOT, env=env, check=True)
    return json.loads(pathlib.Path(json_path).read_text())


def side_of(run, case, side):
    return next(c for c in run['cases'] if c['case'] == case)[side]


def table(runs):
    """`runs`: [(setting, harness results)] in the order they ran."""
    lines = ['| case | side | allocator | rate (median of runs) | speed-up in each pair '
             '| minor faults per unit | system ms per unit | user ms per unit | peak RSS MiB |',
             '|---|---|---|---|---|---|---|---|---|']
    default, tuned = SETTINGS
    for case in CASES:
        unit = next(c for c in runs[0][1]['cases'] if c['case'] == case)['unit']
        for side, label in (('ours', 'ours'), ('peer', 'diffusers')):
            sides = {name: [side_of(run, case, side) for setting, run in runs if setting == name]
                     for name in SETTINGS}
            speedups = ', '.join(f'{t["median"] / d["median"]:.2f}x'
                                 for d, t in zip(sides[default], sides[tuned]))
            for name, measured in sides.items():
                mean = lambda key: statistics.fmean(m[key] for m in measured)  # noqa: E731
                rss = [m['peak_rss_mib'] for m in measured if 'peak_rss_mib' in m]
                lines.append(
                    f'| {case} | {label} | {name} '
                    f'| {statistics.median(m["median"] for m in measured):.1f} {unit} '
                    f'| {speedups if name == tuned else ""} '
                    f'| {mean("minor_faults_per_unit"):.0f} | {mean("system_ms_per_unit"):.2f} '
                    f'| {mean("user_ms_per_unit"):.1f} | {max(rss) if rss else float("nan"):.0f} |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', type=int, default=2, help='A/B pairs, alternating order')
    args = parser.parse_args()
    order = []
    for pair in range(args.pairs):
        names = list(SETTINGS) if pair % 2 == 0 else list(SETTINGS)[::-1]
        order += names
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(order):
            runs.append((name, run_harness(SETTINGS[name], os.path.join(tmp, f'{i}.json'))))
    header = (f'Run {runs[0][1]["date"]} to {runs[-1][1]["date"]} on {runs[0][1]["machine"]}; '
              f'{args.pairs} pairs, in the order {", ".join(order)}. Other processes: at most '
              f'{max(run["other_cores_max"] for _, run in runs):.2f} cores. '
              f'diffusion_jax.allocator: {allocator.settings() or "nothing to set here"}.')
    text = f'{header}\n\n{table(runs)}'
    print(text)
    page = ROOT / 'docs' / 'benchmarks.md'
    before, rest = page.read_text().split(START, 1)
    page.write_text(f'{before}{START}\n{text}\n{END}{rest.split(END, 1)[1]}')
    (ROOT / 'docs' / 'allocator_ab.json').write_text(
        json.dumps([{'setting': name, 'results': run} for name, run in runs], indent=2) + '\n')


if __name__ == '__main__':
    main()
