"""The allocator A/B: the harness run twice, under glibc's default malloc and under
`diffusion_jax.allocator`'s settings, at both sizes (MNIST and CIFAR-10 U-Nets), training and
sampling, ours and diffusers side by side; the table goes to docs/benchmarks.md.

    python -m benchmarks.allocator_ab            # about 15 minutes on 2 cores; an idle machine

Each run is one `python -m benchmarks.run` process (`DIFFUSION_JAX_ALLOCATOR=default` for the
first), so glibc reads its settings at start-up as in a user's run. Per side: throughput,
minor page faults and system time per unit (image or image-step, from getrusage around that
side's timed rounds), and the peak RSS of a child process.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ('train_mnist_b32', 'train_cifar10_b32', 'sample_mnist_16x1000', 'sample_cifar10_16x20')
SETTINGS = {'glibc default': {'DIFFUSION_JAX_ALLOCATOR': 'default'},
            'diffusion_jax.allocator': {}}
START, END = '<!-- allocator_ab:start -->', '<!-- allocator_ab:end -->'


def run_harness(extra_env, json_path):
    env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')}
    env.update(extra_env)
    subprocess.run([sys.executable, '-m', 'benchmarks.run', f'--cases={",".join(CASES)}',
                    f'--json={json_path}'], cwd=ROOT, env=env, check=True)
    return json.loads(pathlib.Path(json_path).read_text())


def table(results):
    lines = ['| case | side | allocator | rate | minor faults per unit | system ms per unit '
             '| user ms per unit | peak RSS MiB |', '|---|---|---|---|---|---|---|---|']
    for case in CASES:
        for side, label in (('ours', 'ours'), ('peer', 'diffusers')):
            for setting, run in results.items():
                r = next(c for c in run['cases'] if c['case'] == case)
                s = r[side]
                lines.append(
                    f'| {case} | {label} | {setting} | {s["median"]:.1f} {r["unit"]} '
                    f'| {s["minor_faults_per_unit"]:.0f} | {s["system_ms_per_unit"]:.2f} '
                    f'| {s["user_ms_per_unit"]:.1f} | {s.get("peak_rss_mib", float("nan")):.0f} |')
    return '\n'.join(lines)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_harness(env, os.path.join(tmp, f'{i}.json'))
                   for i, (name, env) in enumerate(SETTINGS.items())}
    run = results['diffusion_jax.allocator']
    header = (f'Run {run["date"]} on {run["machine"]}; the two settings one after the other. '
              f'Other processes: at most {max(r["other_cores_max"] for r in results.values()):.2f}'
              ' cores.')
    text = f'{header}\n\n{table(results)}'
    print(text)
    page = ROOT / 'docs' / 'benchmarks.md'
    before, rest = page.read_text().split(START, 1)
    page.write_text(f'{before}{START}\n{text}\n{END}{rest.split(END, 1)[1]}')
    (ROOT / 'docs' / 'allocator_ab.json').write_text(json.dumps(results, indent=2) + '\n')


if __name__ == '__main__':
    main()
