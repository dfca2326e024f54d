#!/bin/bash
# cloud-init user data: turn a fresh EC2 GPU instance into a spot-safe trainer that streams
# the shards from S3 and keeps training across interruptions and reboots.
#
#   scripts/ec2/launch_spot.sh --data s3://... --output s3://... ...   # renders this file, launches
#
# Edit the settings block by hand only to use this file without launch_spot.sh.
# On the first boot (cloud-init runs user data once per instance) it:
#   1. picks a Python >= 3.11: the Deep Learning AMI's PyTorch env (/opt/pytorch, whose CUDA
#      torch is reused) if present, else python3.12/3.11/python3;
#   2. installs the project into /opt/imagenet-spot/venv from PROJECT_GIT_URL at
#      PROJECT_GIT_REF (branch, tag or commit), or from PROJECT_PIP_SPEC (a wheel/sdist URL,
#      an s3:// path to one, or anything pip accepts);
#   3. writes /etc/imagenet-spot/train.env: the S3 URLs and settings, no secrets (the
#      instance role provides S3 credentials; boto3 finds them itself);
#   4. installs /opt/imagenet-spot/bin/train-loop.sh and imagenet-spot-train.service,
#      enables it (so every later boot resumes) and starts it.
# Output goes to /var/log/cloud-init-output.log; training logs: journalctl -u imagenet-spot-train.
# For tests: IMAGENET_SPOT_ROOT prefixes every path written, SKIP_INSTALL=1 skips steps 1-2,
# and systemctl runs only without a prefix on a systemd machine.
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
MAX_FAILURES="5"
# <<< settings

ROOT="${IMAGENET_SPOT_ROOT:-}"
APP="$ROOT/opt/imagenet-spot"
VENV="$APP/venv"
SRC="$APP/src"
ETC="$ROOT/etc/imagenet-spot"
STATE_DIR="$ROOT/var/lib/imagenet-spot"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT=imagenet-spot-train.service

log() { printf 'imagenet-spot setup: %s\n' "$*" >&2; }
# A URL fit for a log: no query string (presigned signatures), no user:password@.
redact() {
    local u="${1%%\?*}"
    printf '%s' "${u/\/\/*@/\/\/}"
}
die() { log "error: $*"; exit 1; }

[[ "$DATA" != *CHANGE-ME* && "$OUTPUT" != *CHANGE-ME* ]] || die "set DATA and OUTPUT (or use launch_spot.sh)"

# One IMDSv2 query (token, then GET); empty output when not on EC2.
imds_get() {
    local base="${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}" token
    base="${base%/}"
    token=$(curl -fsS -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$base/latest/api/token") || return 0
    curl -fsS -m 2 -H "X-aws-ec2-metadata-token: $token" "$base/latest/meta-data/$1" || true
}

pick_python() {
    local c
    for c in /opt/pytorch/bin/python3 python3.12 python3.11 python3; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

install_project() {
    local py venv_opts=()
    if ! py=$(pick_python); then
        die "no Python >= 3.11: use the Deep Learning AMI with PyTorch or Ubuntu 24.04"
    fi
    if ! "$py" -c 'import venv, ensurepip' 2>/dev/null && command -v apt-get >/dev/null; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv git
    fi
    # The DLAMI env already has a CUDA build of torch: reuse it instead of downloading another.
    if [[ "$py" == /opt/pytorch/* ]]; then
        venv_opts+=(--system-site-packages)
    fi
    log "creating $VENV with $py"
    "$py" -m venv "${venv_opts[@]}" "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if [[ -n "$PROJECT_PIP_SPEC" ]]; then
        local spec="$PROJECT_PIP_SPEC"
        if [[ "$spec" == s3://* ]]; then
            mkdir -p "$APP/dist"
            aws s3 cp --only-show-errors "$spec" "$APP/dist/" || die "cannot download $spec (aws CLI and the instance role needed)"
            spec="$APP/dist/${spec##*/}"
        fi
        log "installing the project from $(redact "$PROJECT_PIP_SPEC")"
        "$VENV/bin/python" -m pip install -q "$spec"
    elif [[ -n "$PROJECT_GIT_URL" ]]; then
        log "installing the project from $(redact "$PROJECT_GIT_URL") at $PROJECT_GIT_REF"
        rm -rf "$SRC"
        git init -q "$SRC"
        git -C "$SRC" fetch -q --depth 1 "$PROJECT_GIT_URL" "$PROJECT_GIT_REF"
        git -C "$SRC" checkout -q FETCH_HEAD
        "$VENV/bin/python" -m pip install -q "$SRC"
    else
        die "set PROJECT_GIT_URL or PROJECT_PIP_SPEC"
    fi
    "$VENV/bin/python" -c 'import trainer, torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
}

# The restart loop; launch_spot.sh puts scripts/ec2/train-loop.sh into the here-document.
install_train_loop() {
    local dest="$APP/bin/train-loop.sh"
    mkdir -p "$APP/bin"
    cat >"$dest" <<'TRAIN_LOOP_EOF'
# @TRAIN_LOOP@
TRAIN_LOOP_EOF
    if ! head -n 1 "$dest" | grep -q '^#!'; then  # not rendered: take it from the checkout
        [[ -f "$SRC/scripts/ec2/train-loop.sh" ]] || die "train-loop.sh missing: render with launch_spot.sh"
        cp "$SRC/scripts/ec2/train-loop.sh" "$dest"
    fi
    chmod 0755 "$dest"
}

kv() { printf '%s=%q\n' "$1" "$2"; }

write_env() {
    local region
    region=$(imds_get placement/region)
    mkdir -p "$ETC" "$STATE_DIR"
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
        kv MAX_FAILURES "$MAX_FAILURES"
        kv STATE_DIR "$STATE_DIR"
        kv PYTHON "$VENV/bin/python"
        if [[ -n "$region" ]]; then
            kv AWS_DEFAULT_REGION "$region"
        fi
    } >"$ETC/train.env.tmp"
    chmod 0644 "$ETC/train.env.tmp"
    mv "$ETC/train.env.tmp" "$ETC/train.env"
}

write_unit() {
    mkdir -p "$UNIT_DIR"
    cat >"$UNIT_DIR/$UNIT" <<EOF
[Unit]
Description=ImageNet ResNet-50 training from S3 (restart loop; resumes after interruptions and reboots)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart=$APP/bin/train-loop.sh $ETC/train.env
WorkingDirectory=$STATE_DIR
Environment=HOME=/root PYTHONUNBUFFERED=1
# Only the loop gets SIGTERM; it forwards it to torchrun, which forwards it to the ranks
# (DataLoader workers are left to their parent). SIGKILL for stragglers after 120 s.
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

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    install_project
fi
install_train_loop
write_env
write_unit
if [[ -z "$ROOT" && -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable "$UNIT"
    # --no-block: this script runs inside cloud-final; waiting here could deadlock boot.
    systemctl start --no-block "$UNIT"
    log "started $UNIT: journalctl -u ${UNIT%.service} -f"
else
    log "not on a systemd host (or IMAGENET_SPOT_ROOT set): $UNIT written, not started"
fi
