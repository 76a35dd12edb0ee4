"""Where our side of a benchmark case spends its time, by the op of the program each XLA CPU
thunk comes from.

    python -m benchmarks.profile --case=train_cifar10_b32 --calls=2
    python -m benchmarks.profile --case=train_mnist_b32 --calls=10 --xla_flags=...

Runs the case's warm-up, then `calls` timed calls under `jax.profiler`, and prints the thunk time
summed over the devices, grouped by the op name XLA keeps in each instruction's metadata (blocks
of the U-Net merged: `down_1_block_0/conv1` and `up_2_block_1/conv1` are one `X/conv1` row), so
the forward convolutions, their input and weight gradients, the norms and the collectives each
show up as one line. The numbers are thunk durations, not wall time: two devices count twice.
"""

import argparse
import collections
import glob
import re
import sys
import tempfile

from benchmarks import run as bench

BLOCK = re.compile(r'(down|up|mid)_\d+_(block|attn|downsample|upsample)(_\d+)?|'
                   r'mid_(block|attn)_\d')
OP_NAME = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')
# The branch that `lax.platform_dependent` took ('auto' convolutions, models/conv.py): one kernel,
# so not part of the row's name.
PLATFORM_BRANCH = re.compile(r'cond/branch_\d+_fun/')


def op_names(hlo_text):
    """{instruction name: op name of its metadata, blocks merged} of compiled HLO text."""
    names = {}
    for line in hlo_text.splitlines():
        match = OP_NAME.match(line)
        if match:
            name = PLATFORM_BRANCH.sub('', match.group(2).split('/', 1)[-1])
            names[match.group(1)] = BLOCK.sub('X', name)
    return names


def thunk_times(xspace_path):
    """{thunk name: summed duration in seconds} over the XLA threads of a profile."""
    import jax
    profile = jax.profiler.ProfileData.from_file(xspace_path)
    times = collections.Counter()
    for plane in profile.planes:
        if plane.name != '/host:CPU':
            continue
        for line in plane.lines:
            if not line.name.startswith('tf_XLA'):
                continue
            for event in line.events:
                if not (event.name.startswith('end:') or 'Threadpool' in event.name
                        or 'ThunkExecutor' in event.name):
                    times[event.name] += event.duration_ns / 1e9
    return times


def grouped(times, names):
    """Thunk seconds by (kind of thunk, op name)."""
    groups = collections.Counter()
    for thunk, seconds in times.items():
        kind = re.sub(r'\.\d+$', '', thunk).split('_fusion')[0]
        groups[f'{kind} | {names.get(thunk, thunk)}'] += seconds
    return groups


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--case', default='train_mnist_b32', choices=sorted(bench.CASES))
    parser.add_argument('--calls', type=int, default=5)
    parser.add_argument('--top', type=int, default=30)
    parser.add_argument('--xla_flags', default='')
    args = parser.parse_args()
    bench.configure_backends(args.xla_flags, with_torch=False)
    import jax
    workload = bench.make_workload(args.case, 'ours')
    workload.prepare()
    compiled = getattr(workload, 'step_fn', None) or workload.sample_fn
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(args.calls):
                workload.run()
        path = sorted(glob.glob(f'{directory}/**/*.xplane.pb', recursive=True))[-1]
        groups = grouped(thunk_times(path), op_names(compiled.as_text()))
    total = sum(groups.values())
    print(f'{args.case}: {total:.2f} thunk-seconds over {args.calls} calls')
    for name, seconds in groups.most_common(args.top):
        print(f'{seconds:8.3f} s {100 * seconds / total:5.1f}%  {name[:150]}')


if __name__ == '__main__':
    sys.exit(main())
