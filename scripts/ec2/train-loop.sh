#!/usr/bin/env bash
# Restart loop for training on EC2 spot instances: run the trainer until it completes.
#
#   scripts/ec2/train-loop.sh [ENV_FILE]      # default: /etc/imagenet-spot/train.env if present
#
# Run by the systemd unit imagenet-spot-train.service (installed by user-data.sh), so a
# reboot or a persistent spot request restarting the instance resumes training. It runs
#
#   python -m torch.distributed.run --standalone --nproc_per_node=$NPROC \
#       -m trainer --data "$DATA" --output "$OUTPUT" --resume auto $EXTRA_ARGS
#
# (with --nnodes/--rdzv_* instead of --standalone when NNODES > 1) and acts on how it ended:
#
#   0   training complete: write $STATE_DIR/done (holding $OUTPUT), power off if
#       ON_DONE=poweroff and run by systemd (INVOCATION_ID set), exit 0. Later boots see
#       the marker and exit 0 without training.
#   75  interrupted on purpose (SIGTERM or spot notice), checkpoint uploaded: if this loop
#       itself was asked to stop, exit 75 at once; otherwise wait INTERRUPTED_WAIT_S for
#       the instance to go away, and longer while IMDS still posts the notice (checked
#       every NOTICE_RECHECK_S); if the instance survives (false alarm), resume.
#   77  another trainer took over $OUTPUT (its lease; common/lease.py): exit 77, no retry.
#   *   failure: retry with exponential backoff; after MAX_FAILURES consecutive failures
#       exit with the last code. A run longer than PROGRESS_S resets the count.
#
# torchrun reports any failed worker as exit 1, so the trainer also writes its code to
# $IMAGENET_EXIT_STATUS_FILE (trainer.spot.report_exit); that file decides when present.
# SIGTERM/SIGINT to this script are forwarded to the trainer as SIGTERM (systemd uses
# KillMode=mixed so only this script gets the first signal).
#
# Settings (environment or ENV_FILE): DATA, OUTPUT (required unless TRAIN_CMD), NPROC
# (default: number of GPUs, else 1), NNODES (1), RDZV_ENDPOINT (host:port, NNODES>1),
# RDZV_ID, EXTRA_ARGS (split on spaces), PYTHON (python3), STATE_DIR
# (/var/lib/imagenet-spot), MAX_FAILURES (5), BACKOFF_BASE_S (30), BACKOFF_MAX_S (600),
# PROGRESS_S (1800), INTERRUPTED_WAIT_S (180), NOTICE_RECHECK_S (30), ON_DONE (none|poweroff),
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT (90: seconds torchrun gives workers after SIGTERM).
# For tests: TRAIN_CMD replaces the whole command line (run with bash -c).
set -euo pipefail

log() { printf '%s train-loop: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

env_file="${1:-}"
if [[ -n "$env_file" ]]; then
    [[ -r "$env_file" ]] || die "settings file $env_file is not readable"
elif [[ -r /etc/imagenet-spot/train.env ]]; then
    env_file=/etc/imagenet-spot/train.env
fi
if [[ -n "$env_file" ]]; then
    set -a
    # shellcheck source=/dev/null
    source "$env_file"
    set +a
fi

EXIT_INTERRUPTED=75
EXIT_LEASE_LOST=77
PYTHON="${PYTHON:-python3}"
STATE_DIR="${STATE_DIR:-/var/lib/imagenet-spot}"
NNODES="${NNODES:-1}"
RDZV_ID="${RDZV_ID:-imagenet-spot}"
MAX_FAILURES="${MAX_FAILURES:-5}"
BACKOFF_BASE_S="${BACKOFF_BASE_S:-30}"
BACKOFF_MAX_S="${BACKOFF_MAX_S:-600}"
PROGRESS_S="${PROGRESS_S:-1800}"
INTERRUPTED_WAIT_S="${INTERRUPTED_WAIT_S:-180}"
NOTICE_RECHECK_S="${NOTICE_RECHECK_S:-30}"
ON_DONE="${ON_DONE:-none}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}"
export PYTHONUNBUFFERED=1
export IMAGENET_EXIT_STATUS_FILE="$STATE_DIR/last-exit"
done_file="$STATE_DIR/done"

mkdir -p "$STATE_DIR"

# What this run trains; the done marker holds it, so a new OUTPUT on the same instance trains.
if [[ -n "${TRAIN_CMD:-}" ]]; then
    run_id="${OUTPUT:-$TRAIN_CMD}"
else
    [[ -n "${DATA:-}" ]] || die "DATA is not set (s3://bucket/shards or a local folder)"
    [[ -n "${OUTPUT:-}" ]] || die "OUTPUT is not set (s3://bucket/runs/name or a local folder)"
    run_id="$OUTPUT"
fi

build_cmd() {
    if [[ -n "${TRAIN_CMD:-}" ]]; then
        cmd=(bash -c "$TRAIN_CMD")
        return
    fi
    local nproc="${NPROC:-}"
    if [[ -z "$nproc" ]]; then
        nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        [[ "$nproc" -gt 0 ]] || nproc=1
    fi
    cmd=("$PYTHON" -m torch.distributed.run --nproc_per_node="$nproc" --max_restarts=0)
    if [[ "$NNODES" -gt 1 ]]; then
        [[ -n "${RDZV_ENDPOINT:-}" ]] || die "NNODES=$NNODES needs RDZV_ENDPOINT=host:port"
        cmd+=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID")
    else
        cmd+=(--standalone)
    fi
    cmd+=(-m trainer --data "$DATA" --output "$OUTPUT" --resume auto)
    if [[ -n "${EXTRA_ARGS:-}" ]]; then
        local extra
        read -r -a extra <<<"$EXTRA_ARGS"
        cmd+=("${extra[@]}")
    fi
}

# ---------------------------------------------------------------- signals
stop_requested=""
child=""
# shellcheck disable=SC2329  # invoked by the trap below
on_signal() {
    stop_requested=1
    if [[ -n "$child" ]]; then
        log "stop requested: forwarding SIGTERM to pid $child"
        kill -TERM "$child" 2>/dev/null || true
    fi
}
trap on_signal TERM INT

# Run "$@" in the background and wait for it, so a signal to this script is handled (and
# forwarded) while the command runs. Returns the command's exit code.
run_child() {
    "$@" &
    child=$!
    if [[ -n "$stop_requested" ]]; then  # the signal came before $child was known
        kill -TERM "$child" 2>/dev/null || true
    fi
    local rc
    while true; do
        rc=0
        wait "$child" || rc=$?
        # wait returns >128 when a trapped signal interrupts it; the command may still run.
        if [[ "$rc" -gt 128 ]] && kill -0 "$child" 2>/dev/null; then
            continue
        fi
        break
    done
    child=""
    return "$rc"
}

# Sleep that a stop request cuts short.
nap() {
    run_child sleep "$1" || true
}

# True while EC2 still posts a spot interruption notice (IMDSv2; false when IMDS is off or away).
notice_pending() {
    [[ "${AWS_EC2_METADATA_DISABLED:-}" != [Tt]rue ]] || return 1
    local base="${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}" token
    base="${base%/}"
    token=$(curl -fsS -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$base/latest/api/token" \
        2>/dev/null) || return 1
    curl -fsS -m 2 -o /dev/null -H "X-aws-ec2-metadata-token: $token" \
        "$base/latest/meta-data/spot/instance-action" 2>/dev/null
}

# The trainer's own exit code: from the status file when the launcher (torchrun) masked it.
result_code() {
    local rc="$1" code=""
    if [[ "$rc" -ne 0 && -s "$IMAGENET_EXIT_STATUS_FILE" ]]; then
        read -r code <"$IMAGENET_EXIT_STATUS_FILE" || true
        if [[ "$code" =~ ^[0-9]+$ ]]; then
            echo "$code"
            return
        fi
    fi
    echo "$rc"
}

# ---------------------------------------------------------------- main loop
if [[ -f "$done_file" && "$(cat "$done_file")" == "$run_id" ]]; then
    log "training of $run_id already completed ($done_file): nothing to do"
    exit 0
fi

failures=0
attempt=0
while [[ -z "$stop_requested" ]]; do
    attempt=$((attempt + 1))
    build_cmd
    rm -f "$IMAGENET_EXIT_STATUS_FILE"
    log "attempt $attempt: starting training"
    started=$SECONDS
    rc=0
    run_child "${cmd[@]}" || rc=$?
    code=$(result_code "$rc")
    elapsed=$((SECONDS - started))
    log "attempt $attempt ended after ${elapsed}s: exit $rc (trainer status $code)"

    if [[ "$code" -eq 0 ]]; then
        printf '%s\n' "$run_id" >"$done_file"
        log "training complete: wrote $done_file"
        if [[ "$ON_DONE" == "poweroff" && -z "${INVOCATION_ID:-}" ]]; then
            log "ON_DONE=poweroff ignored: only done when run by systemd (the imagenet-spot-train unit)"
        elif [[ "$ON_DONE" == "poweroff" ]]; then
            log "ON_DONE=poweroff: powering off (cancel the persistent spot request to stop relaunches)"
            systemctl --no-block poweroff || log "poweroff failed: stop the instance by hand"
        fi
        exit 0
    fi
    if [[ "$code" -eq "$EXIT_INTERRUPTED" ]]; then
        failures=0
        if [[ -n "$stop_requested" ]]; then
            log "interrupted with a checkpoint saved; stopping as asked (exit $EXIT_INTERRUPTED)"
            exit "$EXIT_INTERRUPTED"
        fi
        log "interrupted with a checkpoint saved; waiting ${INTERRUPTED_WAIT_S}s for the instance to stop"
        nap "$INTERRUPTED_WAIT_S"
        while [[ -z "$stop_requested" ]] && notice_pending; do
            log "the interruption notice is still posted: waiting"
            nap "$NOTICE_RECHECK_S"
        done
        [[ -z "$stop_requested" ]] || exit "$EXIT_INTERRUPTED"
        log "instance still running (false alarm or rebalance only): resuming"
        continue
    fi
    if [[ "$code" -eq "$EXIT_LEASE_LOST" ]]; then
        log "another trainer took over $run_id (its lease): this one stopped writing; not retrying"
        exit "$EXIT_LEASE_LOST"
    fi
    if [[ -n "$stop_requested" ]]; then
        log "stopped as asked while training failed (exit $code)"
        exit "$code"
    fi
    if [[ "$elapsed" -ge "$PROGRESS_S" ]]; then
        failures=0
    fi
    failures=$((failures + 1))
    if [[ "$failures" -ge "$MAX_FAILURES" ]]; then
        log "giving up after $failures consecutive failures (last exit $code)"
        exit "$code"
    fi
    delay=$(awk -v b="$BACKOFF_BASE_S" -v m="$BACKOFF_MAX_S" -v n="$failures" \
        'BEGIN { d = b * 2 ^ (n - 1); if (d > m) d = m; print d }')
    log "failure $failures of $MAX_FAILURES: retrying in ${delay}s"
    nap "$delay"
    [[ -z "$stop_requested" ]] || exit "$code"
done
log "stop requested before training started"
exit "$EXIT_INTERRUPTED"
