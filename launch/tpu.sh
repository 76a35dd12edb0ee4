#!/usr/bin/env bash
# Cloud TPU VM launcher for diffusion_jax: create a TPU VM (directly or through a queued resource),
# set up every worker, train on all of them, read the logs, stop, delete.
#
#   launch/tpu.sh COMMAND [--dry-run] [--env=FILE] [-- EXTRA ARGS]
#
#   preflight
#            on this machine, before anything is created or paid for: compile CONFIG's train
#            step and sampler for ACCELERATOR_TYPE with libtpu's compiler (python -m
#            diffusion_jax.aot; needs `pip install -e '.[tpu]'` here) and stop if it does not
#            fit; EXTRA ARGS are --config.* overrides. create and train run it first unless
#            PREFLIGHT=0
#   create   gcloud ... queued-resources create (QUEUED=1) or tpu-vm create (QUEUED=0);
#            EXTRA ARGS are more gcloud flags
#   status   describe the queued resource (QUEUED=1) or the TPU VM
#   setup    copy this checkout (or clone REPO_URL) to every worker, make a venv, install
#            jax[tpu] and this package; then, if BUCKET is set, what `mount` does
#   mount    install gcsfuse if missing and mount BUCKET at MOUNT on every worker (skipped
#            where it is mounted already): the shared WORKDIR of a multi-host slice
#   data     put CIFAR10_ARCHIVE (a local file or gs:// URL) into DATA_DIR on every worker
#   train    start the training command on every worker under nohup (one log per worker),
#            after checking that MOUNT is mounted if WORKDIR is under it;
#            EXTRA ARGS go to python -m diffusion_jax.main
#   logs     follow worker WORKER's log (WORKER=all: the last lines of every worker's log)
#   stop     SIGTERM the trainer on every worker (it checkpoints and exits), SIGKILL after
#            STOP_TIMEOUT seconds
#   delete   delete the queued resource and its TPU VM (QUEUED=1) or the TPU VM;
#            EXTRA ARGS are more gcloud flags (e.g. --quiet)
#   ssh      a shell on worker WORKER; with EXTRA ARGS, run them (joined by spaces, as ssh does)
#            as a command line in the checkout on every worker (or on WORKER if set)
#
# --dry-run (or DRY_RUN=1) prints the gcloud commands instead of running them. --env=FILE sources
# FILE first (its assignments win over the environment). Every variable is described in
# launch/config.example.env; docs/tpu_pod.md walks through a whole run.
set -euo pipefail

COMMANDS='preflight create status setup mount data train logs stop delete ssh'
# The TPU build of the JAX that setup.cfg pins (tests/test_launch.py checks they agree).
JAX_TPU='jax[tpu]==0.10.2'
LIBTPU_RELEASES='https://storage.googleapis.com/jax-releases/libtpu_releases.html'
# gcsfuse mount flags. Orbax commits a checkpoint by renaming its temporary directory, and
# gcsfuse renames a directory of a (flat namespace) bucket only if it has fewer descendants than
# --rename-dir-limit, which is 0 by default; --implicit-dirs shows directories that exist only as
# object name prefixes (e.g. copied in with gcloud storage cp).
GCSFUSE_FLAGS='--implicit-dirs --rename-dir-limit=100000'

here=${BASH_SOURCE[0]}
[[ $here == */* ]] || here=./$here
ROOT=$(cd "${here%/*}/.." && pwd)

usage() {
    printf 'usage: launch/tpu.sh COMMAND [--dry-run] [--env=FILE] [-- EXTRA ARGS]\n'
    printf 'commands: %s\n' "$COMMANDS"
    printf 'variables: see launch/config.example.env; walkthrough: docs/tpu_pod.md\n'
}

die() {
    printf 'launch/tpu.sh: %s\n' "$*" >&2
    exit 2
}

# require NAME REGEX EXAMPLE: NAME must be set and match REGEX, else stop naming it.
require() {
    local name=$1 regex=$2 example=$3 value
    value=${!name-}
    [[ -n $value ]] \
        || die "$name is not set: set it, e.g. $name=$example (see launch/config.example.env)"
    [[ $value =~ $regex ]] \
        || die "$name='$value' is malformed: expected something like $name=$example"
}

# The arguments as one line of shell words (what --dry-run prints, and what runs): a word with
# other characters than these is single-quoted (after the = of a --flag=, for readability).
quoted() {
    local arg flag words=()
    for arg in "$@"; do
        flag=
        if [[ $arg =~ ^(--[a-z-]+=)(.*)$ ]]; then
            flag=${BASH_REMATCH[1]}
            arg=${BASH_REMATCH[2]}
        fi
        if [[ $arg =~ ^[-A-Za-z0-9_@%+=:,./]*$ ]]; then
            words+=("$flag$arg")
        else
            words+=("$flag'${arg//\'/\'\\\'\'}'")
        fi
    done
    printf '%s\n' "${words[*]}"
}

run() {
    if [[ $DRY_RUN == 1 ]]; then
        quoted "$@"
        return 0
    fi
    printf '+ %s\n' "$(quoted "$@")" >&2
    "$@"
}

# on_workers WORKER COMMAND: run the shell COMMAND over SSH on WORKER (an index or all).
on_workers() {
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
        --worker="$1" --command="$2"
}

((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) \
    || die "needs bash 4.4 or newer, this is $BASH_VERSION (on macOS: brew install bash)"

# ---- the command line
cmd=${1-}
[[ -n $cmd ]] || { usage >&2; exit 2; }
shift
case $cmd in
    -h | --help | help) usage; exit 0 ;;
esac
[[ " $COMMANDS " == *" $cmd "* ]] || die "unknown command '$cmd': valid commands are: $COMMANDS"
extra=()
dry_run_flag=0
while (($#)); do
    case $1 in
        --dry-run) dry_run_flag=1 ;;
        --env=*)
            [[ -f ${1#--env=} ]] || die "--env: no such file: ${1#--env=}"
            set -a
            # shellcheck source=/dev/null
            . "${1#--env=}"
            set +a
            ;;
        --) shift; extra=("$@"); break ;;
        *) die "unknown option '$1': options are --dry-run, --env=FILE; extra args go after --" ;;
    esac
    shift
done
[[ $dry_run_flag == 0 ]] || DRY_RUN=1  # After --env: no file can undo --dry-run.

# ---- validation, before any gcloud command runs
: "${DRY_RUN:=0}" "${QUEUED:=1}" "${CAPACITY:=on-demand}" "${QUEUED_RESOURCE:=${TPU_NAME-}-qr}"
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}" "${REMOTE_DIR:=diffusion_jax}" "${PYTHON:=python3.11}"
: "${REPO_REF:=main}" "${DATA_DIR:=data/cifar10}" "${CONFIG:=configs/cifar10.py}"
: "${STOP_TIMEOUT:=120}" "${MOUNT:=/mnt/ddpm}" "${SHARED_WORKDIR:=0}"
: "${PREFLIGHT:=1}" "${LOCAL_PYTHON:=python3}"
NAME_RE='^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$'
HOME_PATH_RE='^[A-Za-z0-9_][A-Za-z0-9_./-]*$'
BUCKET_RE='^[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9]$'  # A bucket's name, without gs://.
MOUNT_RE='^(/[A-Za-z0-9_][A-Za-z0-9_.-]*)+$'     # Absolute; no . or .. components.
require DRY_RUN '^[01]$' 1
if [[ $cmd != preflight ]]; then  # The preflight runs here and touches no cloud resource.
    require TPU_NAME "$NAME_RE" ddpm-v3-32
    require ZONE '^[a-z]+-[a-z]+[0-9]+-[a-z]$' europe-west4-a
    require PROJECT '^[a-z][-a-z0-9]{4,28}[a-z0-9]$' my-project-123
    require QUEUED '^[01]$' 1
    [[ $QUEUED == 0 ]] || require QUEUED_RESOURCE "$NAME_RE" ddpm-v3-32-qr
fi

require PREFLIGHT '^[01]$' 1
run_preflight=0
[[ $cmd != preflight && ! ( $PREFLIGHT == 1 && ( $cmd == create || $cmd == train ) ) ]] \
    || run_preflight=1
if ((run_preflight)); then
    require ACCELERATOR_TYPE '^v[0-9]+[a-z]*-[0-9]+$' v3-32
    require CONFIG '^configs/[A-Za-z0-9_]+\.py(:[A-Za-z0-9_]+)?$' configs/cifar10.py
    require LOCAL_PYTHON '^[^[:space:]]+$' python3
fi

case $cmd in
    create)
        require ACCELERATOR_TYPE '^v[0-9]+[a-z]*-[0-9]+$' v3-32
        require RUNTIME_VERSION '^[a-z0-9][-a-z0-9.]*$' tpu-ubuntu2204-base
        require CAPACITY '^(on-demand|spot|best-effort|reserved)$' spot
        [[ $CAPACITY != best-effort || $QUEUED == 1 ]] \
            || die "CAPACITY=best-effort needs QUEUED=1 (only queued resources have it)"
        ;;
    setup)
        require REMOTE_DIR "$HOME_PATH_RE" diffusion_jax
        require PYTHON '^python3\.[0-9]+$' python3.11
        if [[ -n ${REPO_URL-} ]]; then
            require REPO_URL '^(https://|ssh://|git@)[^[:space:]]+$' \
                https://github.com/you/diffusion_jax.git
            require REPO_REF '^[A-Za-z0-9_][A-Za-z0-9_./-]*$' main
        fi
        if [[ -n ${BUCKET-} ]]; then
            require BUCKET "$BUCKET_RE" my-bucket
            require MOUNT "$MOUNT_RE" /mnt/ddpm
        fi
        ;;
    mount)
        require BUCKET "$BUCKET_RE" my-bucket
        require MOUNT "$MOUNT_RE" /mnt/ddpm
        ;;
    data)
        require DATA_DIR "$HOME_PATH_RE" data/cifar10
        require CIFAR10_ARCHIVE '(^|/)cifar-10-binary\.tar\.gz$' \
            gs://my-bucket/cifar-10-binary.tar.gz
        [[ $CIFAR10_ARCHIVE == gs://* || -f $CIFAR10_ARCHIVE ]] \
            || die "CIFAR10_ARCHIVE=$CIFAR10_ARCHIVE: no such file (give a local file or gs:// URL)"
        ;;
    train)
        require REMOTE_DIR "$HOME_PATH_RE" diffusion_jax
        require ACCELERATOR_TYPE '^v[0-9]+[a-z]*-[0-9]+$' v3-32
        require MOUNT "$MOUNT_RE" /mnt/ddpm
        require SHARED_WORKDIR '^[01]$' 1
        [[ -z ${BUCKET-} ]] || require BUCKET "$BUCKET_RE" my-bucket
        example=$MOUNT/cifar10-run1
        if [[ ${WORKDIR-} =~ ^gs://([^/]*)/*(.*)$ ]]; then
            example=$MOUNT/${BASH_REMATCH[2]:-cifar10-run1}
            die "WORKDIR=$WORKDIR: the trainer writes WORKDIR with plain file I/O, so a gs:// URL" \
                "does not work: set BUCKET=${BASH_REMATCH[1]:-my-bucket} and use a path under" \
                "MOUNT=$MOUNT, where \`launch/tpu.sh mount\` mounts the bucket with gcsfuse," \
                "e.g. WORKDIR=${example%/}"
        fi
        require WORKDIR '^(/[^/[:space:]]+)+$' "$example"
        [[ $WORKDIR/ != */../* && $WORKDIR/ != */./* ]] \
            || die "WORKDIR=$WORKDIR: give it without . or .. components, e.g. WORKDIR=$example"
        under_mount=0
        [[ $WORKDIR != "$MOUNT"/* ]] || under_mount=1
        # More than 8 cores (v2-v4, v5p) or chips (v5e, v6e) means more than one host, and every
        # host writes its part of each checkpoint into the same WORKDIR.
        if [[ $ACCELERATOR_TYPE =~ -([0-9]+)$ ]] && ((BASH_REMATCH[1] > 8)) \
            && [[ $SHARED_WORKDIR == 0 ]]; then
            ((under_mount)) || die "WORKDIR=$WORKDIR is not under MOUNT=$MOUNT: on" \
                "$ACCELERATOR_TYPE (several hosts) every worker must see the same WORKDIR: set" \
                "BUCKET and use a path under MOUNT, where \`launch/tpu.sh mount\` mounts the" \
                "bucket on every worker (e.g. WORKDIR=$example), or set SHARED_WORKDIR=1 if" \
                "WORKDIR is on storage that every worker mounts already (Filestore, NFS)"
            require BUCKET "$BUCKET_RE" my-bucket
        fi
        require CONFIG '^configs/[A-Za-z0-9_]+\.py(:[A-Za-z0-9_]+)?$' configs/cifar10.py
        require DATA_DIR "$HOME_PATH_RE" data/cifar10
        ;;
    logs | ssh)
        require REMOTE_DIR "$HOME_PATH_RE" diffusion_jax
        [[ -z ${WORKER-} ]] || require WORKER '^([0-9]+|all)$' 0
        ;;
    stop)
        require REMOTE_DIR "$HOME_PATH_RE" diffusion_jax
        require STOP_TIMEOUT '^[0-9]+$' 120
        ;;
esac
case $cmd in
    preflight | create | delete | train | ssh) ;;
    *) ((${#extra[@]} == 0)) || die "$cmd takes no extra arguments (got: ${extra[*]})" ;;
esac
if [[ $DRY_RUN == 0 && $cmd != preflight ]] && ! command -v gcloud >/dev/null; then
    die 'gcloud not found: install the Google Cloud CLI (or use --dry-run to see the commands)'
fi

# ---- the commands
flags=(--zone="${ZONE-}" --project="${PROJECT-}")  # Unset only for preflight, which runs no gcloud.

# The ahead-of-time check, here: CONFIG (with the --config.* overrides among the extra args)
# compiled for ACCELERATOR_TYPE; a config that does not fit stops the script before gcloud runs.
preflight() {
    local arg overrides=()
    for arg in "${extra[@]}"; do
        [[ $arg != --config.* ]] || overrides+=("$arg")
    done
    run "$LOCAL_PYTHON" -m diffusion_jax.aot --config="$ROOT/$CONFIG" \
        --topology="$ACCELERATOR_TYPE" "${overrides[@]}" \
        || die "preflight: $CONFIG on $ACCELERATOR_TYPE failed (the error above); PREFLIGHT=0" \
            "skips the check"
}
((run_preflight == 0)) || preflight
repo=\~/$REMOTE_DIR  # On the workers; their shell expands the ~.
apt='sudo apt-get -o DPkg::Lock::Timeout=600'  # Waits while unattended upgrades run.

# What `mount` runs on each worker: gcsfuse from Google's apt repository (gcsfuse-CODENAME,
# signed with the packages.cloud.google.com key) if it is missing, then the mount unless MOUNT is
# a mount point already. BUCKET and MOUNT match BUCKET_RE and MOUNT_RE: nothing to quote.
mount_command() {
    local keyring=/usr/share/keyrings/cloud.google.asc install mount
    local source="deb [signed-by=$keyring] https://packages.cloud.google.com/apt"
    source+=" gcsfuse-\$(lsb_release -c -s) main"
    install=(
        "echo \"$source\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
        "sudo curl -fsSL -o $keyring https://packages.cloud.google.com/apt/doc/apt-key.gpg"
        "$apt update"
        "$apt install -y gcsfuse"
    )
    mount=(
        "sudo mkdir -p $MOUNT"
        "sudo chown \"\$(id -un)\" $MOUNT"
        "gcsfuse $GCSFUSE_FLAGS $BUCKET $MOUNT"
    )
    printf -v install '%s; ' "${install[@]}"
    printf -v mount '%s; ' "${mount[@]}"
    printf 'set -e; if ! command -v gcsfuse >/dev/null; then %sfi; ' "$install"
    printf 'if mountpoint -q %s; then echo "%s: %s is mounted already"; else %sfi\n' \
        "$MOUNT" "\$(hostname)" "$MOUNT" "$mount"
}

case $cmd in
    preflight) ;;
    create)
        capacity=()
        [[ $CAPACITY == on-demand ]] || capacity=(--"$CAPACITY")
        if [[ $QUEUED == 1 ]]; then
            track=()
            [[ $CAPACITY != best-effort ]] || track=(alpha)  # --best-effort is alpha-only.
            run gcloud "${track[@]}" compute tpus queued-resources create "$QUEUED_RESOURCE" \
                --node-id="$TPU_NAME" "${flags[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
                --runtime-version="$RUNTIME_VERSION" "${capacity[@]}" "${extra[@]}"
        else
            run gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" \
                --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
                "${capacity[@]}" "${extra[@]}"
        fi
        ;;
    status)
        if [[ $QUEUED == 1 ]]; then
            run gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${flags[@]}"
        else
            run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${flags[@]}"
        fi
        ;;
    setup)
        if [[ -n ${REPO_URL-} ]]; then
            url=$(printf '%q' "$REPO_URL")
            ref=$(printf '%q' "$REPO_REF")
            update="git -C $repo fetch --depth=1 origin $ref && git -C $repo checkout -f FETCH_HEAD"
            clone="git clone --depth=1 --branch=$ref $url $repo"
            on_workers all "if [ -d $repo/.git ]; then $update; else $clone; fi"
        else
            on_workers all "mkdir -p $repo"
            run gcloud compute tpus tpu-vm scp --recurse --worker=all "${flags[@]}" \
                "$ROOT/diffusion_jax" "$ROOT/configs" "$ROOT/launch" "$ROOT/setup.cfg" \
                "$ROOT/pyproject.toml" "$ROOT/README.md" "$TPU_NAME:$REMOTE_DIR/"
        fi
        steps=(
            'set -e'
            "cd $repo"
            "$PYTHON --version || { $apt update; $apt install -y $PYTHON $PYTHON-venv; }"
            "[ -x .venv/bin/python ] || $PYTHON -m venv .venv"
            '.venv/bin/pip install -q --upgrade pip'
            ".venv/bin/pip install \"$JAX_TPU\" -f $LIBTPU_RELEASES"
            '.venv/bin/pip install -e .'
        )
        printf -v install '%s; ' "${steps[@]}"
        on_workers all "${install%; }"
        [[ -z ${BUCKET-} ]] || on_workers all "$(mount_command)"
        ;;
    mount)
        on_workers all "$(mount_command)"
        ;;
    data)
        on_workers all "mkdir -p ~/$DATA_DIR"
        if [[ $CIFAR10_ARCHIVE == gs://* ]]; then
            on_workers all "gcloud storage cp $(printf '%q' "$CIFAR10_ARCHIVE") ~/$DATA_DIR/"
        else
            run gcloud compute tpus tpu-vm scp --worker=all "${flags[@]}" \
                "$CIFAR10_ARCHIVE" "$TPU_NAME:$DATA_DIR/"
        fi
        ;;
    train)
        train=(.venv/bin/python -m diffusion_jax.main --config="$CONFIG" --workdir="$WORKDIR"
               --distributed=on)
        line="$(printf '%q ' "${train[@]}")--config.data.manual_dir=\"\$HOME\"/$DATA_DIR"
        ((${#extra[@]} == 0)) || line+=$(printf ' %q' "${extra[@]}")
        start="cd $repo && bash launch/worker.sh start $line"
        if [[ -n ${BUCKET-} ]] && ((under_mount)); then
            # Without its mount a worker would write a WORKDIR of its own, on its own disk.
            stop="echo \"\$(hostname): $MOUNT is not mounted: run launch/tpu.sh mount\" >&2; exit 1"
            start="if ! mountpoint -q $MOUNT; then $stop; fi; $start"
        fi
        on_workers all "$start"
        ;;
    logs)
        if [[ ${WORKER:-0} == all ]]; then
            on_workers all "cd $repo && bash launch/worker.sh logs"
        else
            on_workers "${WORKER:-0}" "cd $repo && bash launch/worker.sh logs -f"
        fi
        ;;
    stop)
        on_workers all "cd $repo && bash launch/worker.sh stop $STOP_TIMEOUT"
        ;;
    delete)
        if [[ $QUEUED == 1 ]]; then
            # --force deletes the queued resource's TPU VM first, then the request.
            run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${flags[@]}" \
                --force "${extra[@]}"
        else
            run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}" "${extra[@]}"
        fi
        ;;
    ssh)
        if ((${#extra[@]})); then
            on_workers "${WORKER:-all}" "cd $repo && ${extra[*]}"
        else
            [[ ${WORKER:-0} != all ]] || die 'an interactive ssh needs one worker: WORKER=0, 1, ...'
            run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker="${WORKER:-0}"
        fi
        ;;
esac
