#!/bin/bash
# cloud-init user data: turn a fresh EC2 GPU instance into a spot-safe trainer that streams
# the shards from S3 and keeps training across interruptions and reboots.
#
#   scripts/ec2/launch_spot.sh --data s3://... --output s3://... ...   # renders this file, launches
#
# Edit the settings block by hand only to use this file without launch_spot.sh.
# First boot (cloud-init runs user data once per instance; this part takes a second):
#   installs the restart loop (/opt/imagenet-spot/bin/train-loop.sh), itself as
#   /opt/imagenet-spot/bin/setup.sh, /etc/imagenet-spot/train.env (settings, no secrets: the
#   instance role provides S3 credentials) and imagenet-spot-train.service, enables the
#   unit and starts it. Nothing can fail before the unit is enabled.
# Every start of the unit (every boot) runs `setup.sh --setup` first (ExecStartPre=); it is
# idempotent and does the slow, fallible part until it has succeeded once:
#   1. a venv /opt/imagenet-spot/venv made with the Deep Learning AMI's PyTorch env's Python
#      (/opt/pytorch or /opt/conda/envs/pytorch), seeing that env's site-packages through a
#      .pth file, so the AMI's CUDA torch is used; pip gets torch==<that version> as a
#      constraint, a dry run must not install torch, and torch must be the AMI's afterwards;
#   2. the project from PROJECT_PIP_SPEC (by default the launcher's wheel under the run's
#      S3 prefix, fetched with the instance role) or PROJECT_GIT_URL at PROJECT_GIT_REF;
#   3. when nvidia-smi lists GPUs: torch.cuda must be available with at least NPROC devices.
# A failed attempt reboots for another try (a stop cut it: the next boot tries again);
# after SETUP_MAX_ATTEMPTS attempts, or at once for what a retry cannot fix (no CUDA, pip
# would replace torch), train-loop.sh --give-up writes the status object under
# $OUTPUT/ec2-status/, puts the reason on the console and powers off (ON_FAIL=poweroff).
# Output: /var/log/cloud-init-output.log (first boot), journalctl -u imagenet-spot-train.
# For tests: IMAGENET_SPOT_ROOT prefixes every path, SKIP_INSTALL=1 skips steps 1-2, and
# systemctl is called without a prefix on a systemd machine, or when IMAGENET_SPOT_SYSTEMCTL=1.
set -euo pipefail

# >>> settings (launch_spot.sh replaces this block)
DATA="s3://CHANGE-ME/imagenet-10pct"
OUTPUT="s3://CHANGE-ME/runs/resnet50"
NPROC=""
NNODES="1"
RDZV_ENDPOINT=""
RDZV_ID="imagenet-spot"
EXTRA_ARGS=""
PROJECT_GIT_URL=""
PROJECT_GIT_REF="main"
PROJECT_PIP_SPEC=""
ON_DONE="poweroff"
ON_FAIL="poweroff"
MAX_FAILURES="5"
WAIT_PEERS_MAX_S="21600"
SETUP_MAX_ATTEMPTS="3"
# <<< settings

ROOT="${IMAGENET_SPOT_ROOT:-}"
APP="$ROOT/opt/imagenet-spot"
VENV="$APP/venv"
SRC="$APP/src"
ETC="$ROOT/etc/imagenet-spot"
STATE_DIR="$ROOT/var/lib/imagenet-spot"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT=imagenet-spot-train.service
LOOP="$APP/bin/train-loop.sh"
SETUP="$APP/bin/setup.sh"
CONSOLE="${ROOT:+$ROOT/dev/console}"
CONSOLE="${CONSOLE:-/dev/console}"
EXIT_FINAL=3  # --install / --check-gpu: a retry cannot fix this

log() { printf 'imagenet-spot setup: %s\n' "$*" >&2; }
# A URL fit for a log: no query string (presigned signatures), no user:password@.
redact() {
    local u="${1%%\?*}"
    printf '%s' "${u/\/\/*@/\/\/}"
}
die() { log "error: $*"; exit 1; }
die_final() { log "error: $*"; exit "$EXIT_FINAL"; }
use_systemctl() { [[ ( -z "$ROOT" && -d /run/systemd/system ) || "${IMAGENET_SPOT_SYSTEMCTL:-}" == 1 ]]; }

[[ "$DATA" != *CHANGE-ME* && "$OUTPUT" != *CHANGE-ME* ]] || die "set DATA and OUTPUT (or use launch_spot.sh)"

# One IMDSv2 query (token, then GET); empty output when not on EC2.
imds_get() {
    local base="${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}" token
    base="${base%/}"
    token=$(curl -fsS -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$base/latest/api/token") || return 0
    curl -fsS -m 2 -H "X-aws-ec2-metadata-token: $token" "$base/latest/meta-data/$1" || true
}

# The Deep Learning AMI's PyTorch environment (a venv or conda env holding CUDA torch), if any.
ami_env() {
    local d
    for d in "$ROOT/opt/pytorch" "$ROOT/opt/conda/envs/pytorch"; do
        if [[ -x "$d/bin/python3" ]]; then
            printf '%s' "$d"
            return 0
        fi
    done
    return 1
}

pick_python() {
    local c env
    if env=$(ami_env); then
        set -- "$env/bin/python3"
    else
        set -- python3.12 python3.11 python3
    fi
    for c in "$@"; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

make_venv() {
    local py env purelib
    py=$(pick_python) || die_final "no Python >= 3.11: use the Deep Learning AMI with PyTorch or Ubuntu 24.04"
    if [[ -f "$VENV/.complete" ]]; then
        return 0
    fi
    if ! "$py" -c 'import venv, ensurepip' 2>/dev/null && command -v apt-get >/dev/null; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv git
    fi
    log "creating $VENV with $py"
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
    if env=$(ami_env); then
        # A venv made from a venv's python sees the base interpreter, not the AMI env:
        # point at the AMI env's site-packages explicitly (after the venv's own).
        purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$env/bin/python3" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
            | sort -u >"$purelib/ami-pytorch-env.pth"
    fi
    touch "$VENV/.complete"
}

# The project source as something pip installs; fetched again on every attempt.
project_spec() {
    if [[ -n "$PROJECT_PIP_SPEC" && "$PROJECT_PIP_SPEC" == s3://* ]]; then
        rm -rf "$APP/dist" && mkdir -p "$APP/dist"
        aws s3 cp --only-show-errors "$PROJECT_PIP_SPEC" "$APP/dist/" >&2 \
            || die "cannot download $(redact "$PROJECT_PIP_SPEC") (aws CLI and the instance role's s3:GetObject needed)"
        printf '%s' "$APP/dist/${PROJECT_PIP_SPEC##*/}"
    elif [[ -n "$PROJECT_PIP_SPEC" ]]; then
        printf '%s' "$PROJECT_PIP_SPEC"
    elif [[ -n "$PROJECT_GIT_URL" ]]; then
        rm -rf "$SRC"
        git init -q "$SRC" >&2
        git -C "$SRC" fetch -q --depth 1 "$PROJECT_GIT_URL" "$PROJECT_GIT_REF" >&2 \
            || die "cannot fetch $(redact "$PROJECT_GIT_URL") at $PROJECT_GIT_REF"
        git -C "$SRC" checkout -q FETCH_HEAD >&2
        printf '%s' "$SRC"
    else
        die_final "set PROJECT_GIT_URL or PROJECT_PIP_SPEC"
    fi
}

TORCH_WHERE='import torch; print(torch.__version__, torch.__file__)'
# name==version of the AMI's torch family (what pip must keep, not replace).
PINS='import importlib.metadata as m
for n in ("torch", "torchvision", "torchaudio", "triton"):
    try: print(f"{n}=={m.version(n)}")
    except m.PackageNotFoundError: pass'

install_project() {
    local py="$VENV/bin/python" spec before="" after constraints="$APP/constraints.txt"
    spec=$(project_spec)  # first: the cheap step that fails most (S3 access, git)
    make_venv
    : >"$constraints"
    if before=$("$py" -c "$TORCH_WHERE" 2>/dev/null); then
        log "reusing the AMI's torch ${before% *} (${before#* })"
        "$py" -c "$PINS" >"$constraints"
        # Belt and braces: a dry run, and a refusal if it would install the torch family.
        "$py" -m pip install -q --dry-run --report "$APP/pip-report.json" -c "$constraints" "$spec" \
            || die "pip cannot resolve the project with the AMI's $(tr '\n' ' ' <"$constraints")(see above)"
        "$py" - "$APP/pip-report.json" "$constraints" <<'PYEOF' || die_final "pip would replace the AMI's torch: use a Deep Learning AMI whose torch the project accepts"
import json, sys
names = [i["metadata"]["name"].lower() for i in json.load(open(sys.argv[1])).get("install", [])]
kept = {line.split("==")[0] for line in open(sys.argv[2]) if line.strip()}
bad = [n for n in names if n in kept or n.startswith("nvidia-")]
print("pip will install:", " ".join(names) or "nothing", file=sys.stderr)
sys.exit(1 if bad else 0)
PYEOF
    fi
    log "installing the project from $(redact "${PROJECT_PIP_SPEC:-$PROJECT_GIT_URL}")"
    "$py" -m pip install -q -c "$constraints" "$spec" || die "pip install failed (see above)"
    after=$("$py" -c "$TORCH_WHERE") || die "torch does not import in $VENV"
    if [[ -n "$before" && "$after" != "$before" ]]; then
        die_final "torch changed from '$before' to '$after': the AMI's torch must be used"
    fi
    "$py" -c 'import trainer' || die "the project does not import in $VENV"
}

# GPUs listed by nvidia-smi: torch must see them, at least NPROC of them (never CPU at GPU prices).
check_gpu() {
    local gpus need try
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [[ "$gpus" -eq 0 ]]; then
        log "nvidia-smi lists no GPUs: the trainer will run on CPU"
        return 0
    fi
    need="${NPROC:-$gpus}"
    for try in 1 2 3; do
        if "$VENV/bin/python" - "$need" <<'PYEOF'; then
import sys, torch
ok = torch.cuda.is_available()
n = torch.cuda.device_count() if ok else 0
print(f"torch {torch.__version__}: cuda available {ok}, {n} devices, {sys.argv[1]} needed", file=sys.stderr)
sys.exit(0 if n >= int(sys.argv[1]) else 1)
PYEOF
            return 0
        fi
        [[ "$try" -eq 3 ]] || sleep "${GPU_RETRY_S:-10}"
    done
    die_final "nvidia-smi lists $gpus GPUs but torch sees fewer than $need usable CUDA devices (driver/fabric manager?)"
}

# The unit's ExecStartPre: install until it has worked once, check the GPUs every boot.
setup() {
    local attempts=0 rc=0 reason
    mkdir -p "$STATE_DIR"
    if [[ ! -f "$STATE_DIR/setup-ok" && "${SKIP_INSTALL:-0}" != 1 ]]; then
        [[ ! -s "$STATE_DIR/setup-attempts" ]] || read -r attempts <"$STATE_DIR/setup-attempts"
        attempts=$((attempts + 1))
        echo "$attempts" >"$STATE_DIR/setup-attempts"  # before the work: a cut attempt counts
        log "set-up attempt $attempts of $SETUP_MAX_ATTEMPTS"
        bash "$SETUP" --install 2>&1 | tee "$STATE_DIR/setup.log" >&2 || rc=$?
        if [[ "$rc" -ne 0 ]]; then
            reason=$(grep 'error:' "$STATE_DIR/setup.log" | tail -n 1 | sed 's/.*error: //') || true
            reason="${reason:-exit $rc, see journalctl -u ${UNIT%.service}}"
            if [[ "$rc" -ne "$EXIT_FINAL" && "$attempts" -lt "$SETUP_MAX_ATTEMPTS" ]]; then
                { printf 'imagenet-spot: set-up attempt %s failed (%s): rebooting to retry\n' "$attempts" "$reason" >>"$CONSOLE"; } 2>/dev/null || true
                log "attempt $attempts failed: $reason; rebooting to retry"
                if use_systemctl; then systemctl --no-block reboot; fi
                exit 1
            fi
            bash "$LOOP" --give-up setup 1 "set-up attempt $attempts failed: $reason" "$ETC/train.env" || true
            exit 1
        fi
        date -u +%Y-%m-%dT%H:%M:%SZ >"$STATE_DIR/setup-ok"
        log "set-up complete"
    fi
    rc=0
    bash "$SETUP" --check-gpu 2>&1 | tee "$STATE_DIR/gpu-check.log" >&2 || rc=$?
    if [[ "$rc" -ne 0 ]]; then
        reason=$(grep 'error:' "$STATE_DIR/gpu-check.log" | tail -n 1 | sed 's/.*error: //') || true
        bash "$LOOP" --give-up setup 1 "GPU check failed: ${reason:-exit $rc}" "$ETC/train.env" || true
        exit 1
    fi
}

# The restart loop; launch_spot.sh puts scripts/ec2/train-loop.sh into the here-document.
install_train_loop() {
    mkdir -p "$APP/bin"
    cat >"$LOOP" <<'TRAIN_LOOP_EOF'
# @TRAIN_LOOP@
TRAIN_LOOP_EOF
    if ! head -n 1 "$LOOP" | grep -q '^#!'; then  # not rendered: take it from beside this file
        local beside
        beside="$(dirname "${BASH_SOURCE[0]}")/train-loop.sh"
        [[ -f "$beside" ]] || die "train-loop.sh missing: render with launch_spot.sh"
        cp "$beside" "$LOOP"
    fi
    chmod 0755 "$LOOP"
}

kv() { printf '%s=%q\n' "$1" "$2"; }

write_env() {
    local region
    region=$(imds_get placement/region)
    mkdir -p "$ETC" "$STATE_DIR" "$(dirname "$CONSOLE")"
    # Sourced by train-loop.sh (bash), hence %q quoting. No credentials here, ever.
    {
        echo "# written by user-data.sh; read by train-loop.sh. No secrets: the instance role provides them."
        kv DATA "$DATA"
        kv OUTPUT "$OUTPUT"
        kv NPROC "$NPROC"
        kv NNODES "$NNODES"
        kv RDZV_ENDPOINT "$RDZV_ENDPOINT"
        kv RDZV_ID "$RDZV_ID"
        kv EXTRA_ARGS "$EXTRA_ARGS"
        kv ON_DONE "$ON_DONE"
        kv ON_FAIL "$ON_FAIL"
        kv MAX_FAILURES "$MAX_FAILURES"
        kv WAIT_PEERS_MAX_S "$WAIT_PEERS_MAX_S"
        kv STATE_DIR "$STATE_DIR"
        kv CONSOLE "$CONSOLE"
        kv PYTHON "$VENV/bin/python"
        if [[ -n "$region" ]]; then
            kv AWS_DEFAULT_REGION "$region"
        fi
    } >"$ETC/train.env.tmp"
    chmod 0644 "$ETC/train.env.tmp"
    mv "$ETC/train.env.tmp" "$ETC/train.env"
}

# The NVIDIA services this AMI has (the unit starts after them; CUDA needs them up).
nvidia_units() {
    local u
    use_systemctl || return 0
    for u in nvidia-persistenced.service nvidia-fabricmanager.service; do
        if systemctl list-unit-files --no-legend "$u" 2>/dev/null | grep -q "^$u"; then
            printf ' %s' "$u"
        fi
    done
}

write_unit() {
    local nv
    nv=$(nvidia_units)
    mkdir -p "$UNIT_DIR"
    cat >"$UNIT_DIR/$UNIT" <<EOF
[Unit]
Description=ImageNet ResNet-50 training from S3 (restart loop; resumes after interruptions and reboots)
Wants=network-online.target$nv
After=network-online.target$nv

[Service]
Type=simple
# Set-up until it has succeeded once (idempotent; every boot), then the GPU check.
ExecStartPre=$SETUP --setup
TimeoutStartSec=3600
ExecStart=$LOOP $ETC/train.env
WorkingDirectory=$STATE_DIR
Environment=HOME=/root PYTHONUNBUFFERED=1
# Only the loop gets SIGTERM; it sends it to the ranks (not to torchrun, whose own timer
# would SIGKILL them), DataLoader workers are left to their parent. SIGKILL after 120 s.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=120
# 75 = interrupted with a checkpoint saved: a clean stop, not a failure.
SuccessExitStatus=75
Restart=on-abnormal
RestartSec=30
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
EOF
}

case "${1:-}" in
    --setup) setup; exit 0 ;;
    --install) [[ "${SKIP_INSTALL:-0}" == 1 ]] || install_project; exit 0 ;;
    --check-gpu) check_gpu; exit 0 ;;
    "") ;;
    *) die "unknown argument $1 (none, --setup, --install or --check-gpu)" ;;
esac

# First boot: files, unit enabled, started; the slow part runs in the unit (ExecStartPre).
install_train_loop
mkdir -p "$APP/bin"
if [[ "$(readlink -f "${BASH_SOURCE[0]}")" != "$(readlink -f "$SETUP" 2>/dev/null || true)" ]]; then
    cp "${BASH_SOURCE[0]}" "$SETUP.tmp" && chmod 0755 "$SETUP.tmp" && mv "$SETUP.tmp" "$SETUP"
fi
write_env
write_unit
if use_systemctl; then
    systemctl daemon-reload
    systemctl enable "$UNIT"
    # --no-block: this script runs inside cloud-final; waiting here could deadlock boot.
    systemctl start --no-block "$UNIT"
    log "started $UNIT (set-up, then training): journalctl -u ${UNIT%.service} -f"
else
    log "not on a systemd host (or IMAGENET_SPOT_ROOT set): $UNIT written, not started"
fi
