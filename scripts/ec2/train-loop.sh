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
#   76  the trainer's hang watchdog fired: retried like a failure (resumes from the last
#       checkpoint; counts toward MAX_FAILURES, so a hang that repeats at once gives up).
#   77  another writer holds the run (lease lost): terminal, never retried.
#   *   failure (1, 2 bad input, ...): retry with exponential backoff; after MAX_FAILURES
#       consecutive failures give up. A run longer than PROGRESS_S resets the count.
#       Multi-node, after a 75 (also one from before a reboot: $STATE_DIR/peers-wait-since),
#       failures the trainer did not report (rendezvous with peers that are away) are
#       "waiting for peers", not failures, for up to WAIT_PEERS_MAX_S (then terminal).
#
# Terminal ends (77, giving up, the peer wait cap, a failed set-up: --give-up) write a
# status object (JSON: stage, exit code, reason, time, instance; no secrets) and the log
# tail next to it under $OUTPUT/ec2-status/, then power off when ON_FAIL=poweroff and run
# by systemd, so no failure leaves an idle instance billing.
#
#   train-loop.sh --give-up STAGE CODE REASON [ENV_FILE]   # that terminal path alone
#
# torchrun reports any failed worker as exit 1, so the trainer also writes its code to
# $IMAGENET_EXIT_STATUS_FILE (trainer.spot.report_exit); that file decides when present.
# SIGTERM/SIGINT to this script go as SIGTERM to the ranks themselves (torchrun's
# children), not to torchrun, which sees them exit: torchrun never starts its own
# SIGKILL timer (30 s on torch before 2026-03, whatever TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# says), so the ranks have the unit's full TimeoutStopSec for the checkpoint upload.
#
# Settings (environment or ENV_FILE): DATA, OUTPUT (required unless TRAIN_CMD), NPROC
# (default: number of GPUs, else 1), NNODES (1), RDZV_ENDPOINT (host:port, NNODES>1; this
# node hosts the c10d store iff its private IP from IMDS is host), RDZV_ID, EXTRA_ARGS
# (split on spaces; --device cuda is added when nvidia-smi lists GPUs), PYTHON (python3),
# STATE_DIR (/var/lib/imagenet-spot), MAX_FAILURES (5), BACKOFF_BASE_S (30), BACKOFF_MAX_S
# (600), PROGRESS_S (1800), INTERRUPTED_WAIT_S (180), NOTICE_RECHECK_S (30),
# WAIT_PEERS_MAX_S (21600), PEER_RETRY_S (60), ON_DONE and ON_FAIL (none|poweroff), CONSOLE (/dev/console),
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT (90). For tests: TRAIN_CMD replaces the command line.
set -euo pipefail

log() { printf '%s train-loop: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

give_up_args=()
if [[ "${1:-}" == --give-up ]]; then
    [[ $# -ge 4 ]] || die "usage: train-loop.sh --give-up STAGE CODE REASON [ENV_FILE]"
    give_up_args=("$2" "$3" "$4")
    shift 4
fi
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
EXIT_HUNG=76
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
WAIT_PEERS_MAX_S="${WAIT_PEERS_MAX_S:-21600}"
PEER_RETRY_S="${PEER_RETRY_S:-60}"
ON_DONE="${ON_DONE:-none}"
ON_FAIL="${ON_FAIL:-none}"
CONSOLE="${CONSOLE:-/dev/console}"
UNIT_NAME="${UNIT_NAME:-imagenet-spot-train}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}"
export PYTHONUNBUFFERED=1
export IMAGENET_EXIT_STATUS_FILE="$STATE_DIR/last-exit"
done_file="$STATE_DIR/done"
wait_file="$STATE_DIR/peers-wait-since"

mkdir -p "$STATE_DIR"

# ---------------------------------------------------------------- IMDS, status, power off
# One IMDSv2 query (token, then GET); fails when IMDS is off or away.
imds_get() {
    [[ "${AWS_EC2_METADATA_DISABLED:-}" != [Tt]rue ]] || return 1
    local base="${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}" token
    base="${base%/}"
    token=$(curl -fsS -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$base/latest/api/token" \
        2>/dev/null) || return 1
    curl -fsS -m 2 -H "X-aws-ec2-metadata-token: $token" "$base/latest/meta-data/$1" 2>/dev/null
}

# True while EC2 still posts a spot interruption notice.
notice_pending() {
    imds_get spot/instance-action >/dev/null
}

json_str() {  # a JSON string: quotes and backslashes escaped, control characters dropped
    local s="${1//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"
}

# Put stdin at $OUTPUT/ec2-status/NAME (S3 through the aws CLI and the instance role, or a folder).
put_status_file() {
    local url="${OUTPUT%/}/ec2-status/$1"
    if [[ "$OUTPUT" == s3://* ]]; then
        timeout 60 aws s3 cp --only-show-errors - "$url"
    else
        mkdir -p "${OUTPUT%/}/ec2-status" && cat >"$url"
    fi
}

# The end of every path that must not retry: status object and logs, then power off.
give_up() {
    local stage="$1" code="$2" reason="$3" instance host when status
    [[ "$code" =~ ^[0-9]+$ ]] || code=1
    instance=$(imds_get instance-id) || instance=unknown
    host=$(hostname 2>/dev/null) || host=unknown
    when=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    log "giving up ($stage, exit $code): $reason"
    status=$(printf '{"stage": %s, "exit_code": %s, "reason": %s, "time": %s, "instance_id": %s, "host": %s, "output": %s, "action": %s}' \
        "$(json_str "$stage")" "$code" "$(json_str "$reason")" "$(json_str "$when")" \
        "$(json_str "$instance")" "$(json_str "$host")" "$(json_str "${OUTPUT:-}")" "$(json_str "$ON_FAIL")")
    printf '%s\n' "$status" >"$STATE_DIR/status.json"
    if [[ -n "${OUTPUT:-}" ]]; then
        if command -v journalctl >/dev/null 2>&1; then
            timeout 10 journalctl --sync 2>/dev/null || true
            timeout 30 journalctl -b -u "$UNIT_NAME" --no-pager -n 500 2>/dev/null \
                | put_status_file "$instance.log" || log "could not upload the log tail"
        fi
        if printf '%s\n' "$status" | put_status_file "$instance.json"; then
            log "status written to ${OUTPUT%/}/ec2-status/$instance.json"
        else
            log "could not write the status object under $OUTPUT (status: $STATE_DIR/status.json)"
        fi
    fi
    { printf 'imagenet-spot: %s failed (exit %s): %s\n' "$stage" "$code" "$reason" >>"$CONSOLE"; } 2>/dev/null || true
    if [[ "$ON_FAIL" == poweroff && -n "${INVOCATION_ID:-}" ]]; then
        { printf 'imagenet-spot: powering off\n' >>"$CONSOLE"; } 2>/dev/null || true
        log "ON_FAIL=poweroff: powering off (nothing is left to do on this instance)"
        systemctl --no-block poweroff || poweroff || log "poweroff failed: stop the instance by hand"
    elif [[ "$ON_FAIL" == poweroff ]]; then
        log "ON_FAIL=poweroff ignored: only done when run by systemd (the $UNIT_NAME unit)"
    fi
}

if [[ ${#give_up_args[@]} -gt 0 ]]; then
    give_up "${give_up_args[@]}"
    exit "${give_up_args[1]}"
fi

# What this run trains; the done marker holds it, so a new OUTPUT on the same instance trains.
if [[ -n "${TRAIN_CMD:-}" ]]; then
    run_id="${OUTPUT:-$TRAIN_CMD}"
else
    [[ -n "${DATA:-}" ]] || die "DATA is not set (s3://bucket/shards or a local folder)"
    [[ -n "${OUTPUT:-}" ]] || die "OUTPUT is not set (s3://bucket/runs/name or a local folder)"
    run_id="$OUTPUT"
fi

# Whether this node hosts the c10d store: its private IP (IMDS) against the endpoint's host.
rdzv_is_host() {
    local host="${RDZV_ENDPOINT%:*}" ip
    ip=$(imds_get local-ipv4) || ip=""
    if [[ -z "$ip" ]]; then
        ip=$(hostname -I 2>/dev/null) || ip=""
    fi
    [[ " $ip " == *" $host "* ]]
}

build_cmd() {
    if [[ -n "${TRAIN_CMD:-}" ]]; then
        cmd=(bash -c "$TRAIN_CMD")
        return
    fi
    local nproc="${NPROC:-}" gpus extra=()
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ -n "$nproc" ]] || nproc="$gpus"
    [[ "$nproc" -gt 0 ]] || nproc=1
    cmd=("$PYTHON" -m torch.distributed.run --nproc_per_node="$nproc" --max_restarts=0)
    if [[ "$NNODES" -gt 1 ]]; then
        [[ -n "${RDZV_ENDPOINT:-}" ]] || die "NNODES=$NNODES needs RDZV_ENDPOINT=host:port"
        local is_host=false
        if rdzv_is_host; then is_host=true; fi
        cmd+=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID"
            --rdzv_conf="is_host=$is_host")
    else
        cmd+=(--standalone)
    fi
    cmd+=(-m trainer --data "$DATA" --output "$OUTPUT" --resume auto)
    if [[ -n "${EXTRA_ARGS:-}" ]]; then
        read -r -a extra <<<"$EXTRA_ARGS"
    fi
    # GPUs listed: train on them; never fall back to CPU at GPU prices (--device auto would).
    if [[ "$gpus" -gt 0 && " ${EXTRA_ARGS:-} " != *" --device "* ]]; then
        cmd+=(--device cuda)
    fi
    cmd+=("${extra[@]}")
}

# ---------------------------------------------------------------- signals
stop_requested=""
child=""
# SIGTERM for the ranks (torchrun's children, each in its own session); torchrun itself is
# left alone so that it does not start its SIGKILL timer. Any other command gets it itself.
# shellcheck disable=SC2329  # called from on_signal (a trap)
signal_ranks() {
    local ranks=""
    if tr '\0' ' ' <"/proc/$child/cmdline" 2>/dev/null | grep -Eq 'torch\.distributed\.run|torchrun'; then
        ranks=$(pgrep -P "$child" 2>/dev/null | tr '\n' ' ') || ranks=""
    fi
    if [[ -n "${ranks// /}" ]]; then
        log "stop requested: SIGTERM to the ranks (pids $ranks), torchrun sees them exit"
        # shellcheck disable=SC2086  # a list of pids
        kill -TERM $ranks 2>/dev/null || true
    else
        log "stop requested: forwarding SIGTERM to pid $child"
        kill -TERM "$child" 2>/dev/null || true
    fi
}
# shellcheck disable=SC2329  # invoked by the trap below
on_signal() {
    stop_requested=1
    if [[ -n "$child" ]]; then
        signal_ranks
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

# Multi-node after an interruption: an unreported failure is a wait for peers (capped).
# Returns 0 (and naps) while waiting, 1 when the failure counts as a failure.
wait_for_peers() {
    local code="$1" since now
    [[ "$NNODES" -gt 1 && -s "$wait_file" && ! -s "$IMAGENET_EXIT_STATUS_FILE" ]] || return 1
    read -r since <"$wait_file" || return 1
    now=$(date +%s)
    if [[ $((now - since)) -ge "$WAIT_PEERS_MAX_S" ]]; then
        give_up waiting-for-peers "$code" "the other nodes did not come back within ${WAIT_PEERS_MAX_S}s of the interruption"
        exit "$code"
    fi
    log "peers not all back yet (exit $code, waiting $((now - since))s of ${WAIT_PEERS_MAX_S}s): retrying in ${PEER_RETRY_S}s"
    nap "$PEER_RETRY_S"
    return 0
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
    if [[ "$elapsed" -ge "$PROGRESS_S" ]]; then
        failures=0
        rm -f "$wait_file"
    fi

    if [[ "$code" -eq 0 ]]; then
        printf '%s\n' "$run_id" >"$done_file"
        rm -f "$wait_file"
        log "training complete: wrote $done_file"
        if [[ "$ON_DONE" == "poweroff" && -z "${INVOCATION_ID:-}" ]]; then
            log "ON_DONE=poweroff ignored: only done when run by systemd (the imagenet-spot-train unit)"
        elif [[ "$ON_DONE" == "poweroff" ]]; then
            log "ON_DONE=poweroff: powering off (cancel the persistent spot request to stop relaunches)"
            systemctl --no-block poweroff || poweroff || log "poweroff failed: stop the instance by hand"
        fi
        exit 0
    fi
    if [[ "$code" -eq "$EXIT_INTERRUPTED" ]]; then
        failures=0
        date +%s >"$wait_file"
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
        log "instance still running (false alarm, rebalance only, or a peer was interrupted): resuming"
        continue
    fi
    if [[ -n "$stop_requested" ]]; then
        log "stopped as asked while training failed (exit $code)"
        exit "$code"
    fi
    if [[ "$code" -eq "$EXIT_LEASE_LOST" ]]; then
        give_up train "$code" "another trainer took over the lease on $run_id: not retrying here"
        exit "$code"
    fi
    if wait_for_peers "$code"; then
        continue
    fi
    failures=$((failures + 1))
    [[ "$code" -ne "$EXIT_HUNG" ]] || log "the hang watchdog fired (exit $EXIT_HUNG): resuming from the last checkpoint"
    if [[ "$failures" -ge "$MAX_FAILURES" ]]; then
        give_up train "$code" "$failures consecutive failures (last exit $code)"
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
