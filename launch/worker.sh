#!/usr/bin/env bash
# Runs on each TPU VM worker, in the checkout (launch/tpu.sh calls it over SSH): starts the
# training command in the background so that it outlives the SSH session, stops it, shows its log.
# The log and pid files are per host (logs/train-HOST.log), so a checkout on a shared disk works.
#
#   bash launch/worker.sh start COMMAND...  # nohup COMMAND, appending to logs/train-HOST.log
#   bash launch/worker.sh stop [SECONDS]    # SIGTERM (the trainer checkpoints and exits 0),
#                                           # SIGKILL if it is still running after SECONDS (120)
#   bash launch/worker.sh logs [-f]         # the log's last 100 lines; -f follows it
set -euo pipefail

here=${BASH_SOURCE[0]}
[[ $here == */* ]] || here=./$here
cd "${here%/*}/.."
host=$(hostname)
log_file=logs/train-$host.log
pid_file=logs/train-$host.pid

die() {
    printf '%s: %s\n' "$host" "$*" >&2
    exit 1
}

# Whether the process in the pid file is alive (a zombie, exited but not reaped, is not).
running() {
    local state
    [[ -f $pid_file ]] || return 1
    state=$(ps -o stat= -p "$(<"$pid_file")" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}

case ${1-} in
    start)
        shift
        (($#)) || die 'start needs the command to run'
        mkdir -p logs
        ! running || die "training is already running (pid $(<"$pid_file")): stop it first"
        printf '\n=== %s start: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$log_file"
        nohup "$@" >>"$log_file" 2>&1 </dev/null &
        echo "$!" >"$pid_file"
        sleep 2  # Catches a command that cannot start at all (no venv, a typo).
        if ! running; then
            tail -n 20 "$log_file" >&2
            die "the command exited at once (log: $PWD/$log_file)"
        fi
        echo "$host: started pid $(<"$pid_file"), log $PWD/$log_file"
        ;;
    stop)
        timeout=${2:-120}
        if ! running; then
            rm -f "$pid_file"
            echo "$host: no training process running"
            exit 0
        fi
        pid=$(<"$pid_file")
        kill -TERM "$pid"
        echo "$host: sent SIGTERM to pid $pid; waiting ${timeout}s at most for it to save and exit"
        for ((i = 0; i < timeout * 10; i++)); do
            running || break
            sleep 0.1
        done
        if running; then
            kill -KILL "$pid"
            echo "$host: pid $pid still running after ${timeout}s: sent SIGKILL"
        else
            echo "$host: stopped"
        fi
        rm -f "$pid_file"
        ;;
    logs)
        [[ -f $log_file ]] || die "no log yet ($PWD/$log_file)"
        if [[ ${2-} == -f ]]; then
            tail -n 100 -F "$log_file"
        else
            echo "== $host: $PWD/$log_file"
            tail -n 100 "$log_file"
        fi
        ;;
    *)
        die "usage: bash launch/worker.sh start COMMAND... | stop [SECONDS] | logs [-f]"
        ;;
esac
