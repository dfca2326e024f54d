#!/usr/bin/env bash
# Launch spot GPU instance(s) that train from S3 and survive interruptions.
#
#   scripts/ec2/launch_spot.sh --data s3://bucket/imagenet-10pct --output s3://bucket/runs/r50 \
#       --instance-type g5.12xlarge --nproc 4 --ami ami-0123... \
#       --iam-instance-profile imagenet-trainer [--subnet subnet-...] [--security-group sg-...] \
#       [--key-name KEY] [--region R] [--nnodes N --rdzv-host 10.0.1.10] [--dry-run]
#       [--on-done poweroff|none] [--on-fail poweroff|none] [--max-failures 5]
#       [--setup-attempts 3] [--peer-wait-minutes 360] [--project-git https://... --project-ref REF]
#
# Code: by default a wheel of this checkout (uncommitted and unpushed changes included) is
# built here and uploaded to OUTPUT/code/<time>/; the instances install it with their role
# (no git access needed). --project-git takes a public https URL (no user@ or tokens: user
# data is readable on the instance and through the EC2 API); --project-pip any pip spec.
# The wheel is built offline by $PYTHON (default python3; needs pip and setuptools>=68).
# Renders scripts/ec2/user-data.sh with these settings (and scripts/ec2/train-loop.sh
# embedded), gzips it (cloud-init unpacks it; EC2 allows 16 KB), then runs
# `aws ec2 run-instances` with a *persistent* spot request whose interruption behaviour is
# *stop*: an interrupted instance keeps its disk and is started again when capacity
# returns, and the systemd unit resumes training (--resume auto). A failure that training
# cannot get past powers the instance off (--on-fail poweroff) after writing
# OUTPUT/ec2-status/<instance>.json. If launching a later node fails, the requests and
# instances already launched are cancelled and terminated.
# --dry-run prints the rendered user data and the aws command(s) instead of running them.
#
# Multi-node (--nnodes N): node 0 gets the fixed private IP --rdzv-host (needs --subnet;
# pick a free address in it) and hosts torchrun's c10d rendezvous on port 29400; nodes
# 1..N-1 are launched with the same user data. The security group must allow all traffic
# between its members.
#
# No credentials are read or embedded: the instances use --iam-instance-profile.
# Needs bash >= 4.4 (macOS: brew install bash) and, without --dry-run, the aws CLI.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
USER_DATA_MAX=16384  # EC2's limit on user data before base64

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { printf 'launch_spot: error: %s\n' "$*" >&2; exit 2; }

DATA="" OUTPUT="" INSTANCE_TYPE="g5.12xlarge" NPROC="" NNODES=1 RDZV_HOST="" RDZV_PORT=29400
AMI="" SUBNET="" KEY_NAME="" PROFILE="" REGION="" PLACEMENT_GROUP="" VOLUME_GB=200 ROOT_DEVICE=""
NAME="imagenet-spot" EXTRA_ARGS="" PROJECT_GIT_URL="" PROJECT_GIT_REF="" PROJECT_PIP_SPEC=""
ON_DONE="poweroff" ON_FAIL="poweroff" MAX_FAILURES=5 SETUP_ATTEMPTS=3 PEER_WAIT_MINUTES=360
DRY_RUN="" USER_DATA_OUT="" PYTHON="${PYTHON:-python3}"
SECURITY_GROUPS=()

need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --data) need "$@"; DATA="$2"; shift 2 ;;
        --output) need "$@"; OUTPUT="$2"; shift 2 ;;
        --instance-type) need "$@"; INSTANCE_TYPE="$2"; shift 2 ;;
        --nproc) need "$@"; NPROC="$2"; shift 2 ;;
        --nnodes) need "$@"; NNODES="$2"; shift 2 ;;
        --rdzv-host) need "$@"; RDZV_HOST="$2"; shift 2 ;;
        --rdzv-port) need "$@"; RDZV_PORT="$2"; shift 2 ;;
        --ami) need "$@"; AMI="$2"; shift 2 ;;
        --subnet) need "$@"; SUBNET="$2"; shift 2 ;;
        --security-group) need "$@"; SECURITY_GROUPS+=("$2"); shift 2 ;;
        --key-name) need "$@"; KEY_NAME="$2"; shift 2 ;;
        --iam-instance-profile) need "$@"; PROFILE="$2"; shift 2 ;;
        --region) need "$@"; REGION="$2"; shift 2 ;;
        --placement-group) need "$@"; PLACEMENT_GROUP="$2"; shift 2 ;;
        --volume-gb) need "$@"; VOLUME_GB="$2"; shift 2 ;;
        --root-device) need "$@"; ROOT_DEVICE="$2"; shift 2 ;;
        --name) need "$@"; NAME="$2"; shift 2 ;;
        --extra-args) need "$@"; EXTRA_ARGS="$2"; shift 2 ;;
        --project-git) need "$@"; PROJECT_GIT_URL="$2"; shift 2 ;;
        --project-ref) need "$@"; PROJECT_GIT_REF="$2"; shift 2 ;;
        --project-pip) need "$@"; PROJECT_PIP_SPEC="$2"; shift 2 ;;
        --on-done) need "$@"; ON_DONE="$2"; shift 2 ;;
        --on-fail) need "$@"; ON_FAIL="$2"; shift 2 ;;
        --max-failures) need "$@"; MAX_FAILURES="$2"; shift 2 ;;
        --setup-attempts) need "$@"; SETUP_ATTEMPTS="$2"; shift 2 ;;
        --peer-wait-minutes) need "$@"; PEER_WAIT_MINUTES="$2"; shift 2 ;;
        --user-data-out) need "$@"; USER_DATA_OUT="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

# ---------------------------------------------------------------- validation
[[ "$DATA" == s3://?* ]] || die "--data must be an s3:// URL of the shards (got '${DATA}')"
[[ "$OUTPUT" == s3://?* ]] || die "--output must be an s3:// URL for checkpoints and logs (got '${OUTPUT}')"
[[ -n "$AMI" ]] || die "--ami is required (a Deep Learning AMI with PyTorch for your region; see README.md, "Training on EC2 spot instances")"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer"
[[ -z "$NPROC" || "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer"
[[ "$VOLUME_GB" =~ ^[1-9][0-9]*$ ]] || die "--volume-gb must be a positive integer"
[[ "$ON_DONE" == none || "$ON_DONE" == poweroff ]] || die "--on-done must be none or poweroff"
[[ "$ON_FAIL" == none || "$ON_FAIL" == poweroff ]] || die "--on-fail must be none or poweroff"
for n in MAX_FAILURES SETUP_ATTEMPTS PEER_WAIT_MINUTES; do
    [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "--$(tr 'A-Z_' 'a-z-' <<<"$n") must be a positive integer"
done
RDZV_ENDPOINT=""
if [[ "$NNODES" -gt 1 ]]; then
    [[ -n "$RDZV_HOST" ]] || die "--nnodes $NNODES needs --rdzv-host (a free private IP in --subnet for node 0)"
    [[ -n "$SUBNET" ]] || die "--rdzv-host needs --subnet (the fixed IP must belong to it)"
    RDZV_ENDPOINT="$RDZV_HOST:$RDZV_PORT"
fi
if [[ -n "$PROJECT_GIT_URL" && ! "$PROJECT_GIT_URL" =~ ^https://[^/@:?#]+(:[0-9]+)?/[^@?#]*$ ]]; then
    die "--project-git must be a public https:// URL without user@, tokens or ssh (got a non-https or credential-bearing URL): drop it to ship this checkout as a wheel"
fi
PROJECT_GIT_REF="${PROJECT_GIT_REF:-main}"
# User data is readable on the instance and through the EC2 API: no credentials in it.
if [[ "$PROJECT_PIP_SPEC" =~ ://[^/]*@ || "$PROJECT_PIP_SPEC" == *X-Amz-Signature* || "$PROJECT_PIP_SPEC" == *X-Amz-Credential* ]]; then
    die "project URLs must not carry credentials (user@, user:password@ or presigned): use s3:// and the instance role"
fi
WHEEL=""
if [[ -z "$PROJECT_GIT_URL" && -z "$PROJECT_PIP_SPEC" ]]; then
    # Default: this checkout as a wheel under the run's prefix; the instance role fetches it.
    WHEEL="imagenet_spot-$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml")-py3-none-any.whl"
    PROJECT_PIP_SPEC="${OUTPUT%/}/code/$(date -u +%Y%m%dT%H%M%SZ)/$WHEEL"
fi
if [[ -z "$PROFILE" ]]; then
    printf 'launch_spot: warning: no --iam-instance-profile: the instance will have no S3 access\n' >&2
fi

# ---------------------------------------------------------------- render user data
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
{
    printf '%s=%q\n' DATA "$DATA" OUTPUT "$OUTPUT" NPROC "$NPROC" NNODES "$NNODES" \
        RDZV_ENDPOINT "$RDZV_ENDPOINT" RDZV_ID "$NAME" EXTRA_ARGS "$EXTRA_ARGS" \
        PROJECT_GIT_URL "$PROJECT_GIT_URL" PROJECT_GIT_REF "$PROJECT_GIT_REF" \
        PROJECT_PIP_SPEC "$PROJECT_PIP_SPEC" ON_DONE "$ON_DONE" ON_FAIL "$ON_FAIL" \
        MAX_FAILURES "$MAX_FAILURES" WAIT_PEERS_MAX_S "$((PEER_WAIT_MINUTES * 60))" \
        SETUP_MAX_ATTEMPTS "$SETUP_ATTEMPTS"
} >"$tmp/settings"
if grep -qx 'TRAIN_LOOP_EOF' "$here/train-loop.sh"; then
    die "train-loop.sh contains the here-document terminator TRAIN_LOOP_EOF"
fi
user_data="${USER_DATA_OUT:-$tmp/user-data.sh}"
awk -v settings="$tmp/settings" -v loop="$here/train-loop.sh" '
    /^# >>> settings/ { print; while ((getline line < settings) > 0) print line; skip = 1; next }
    /^# <<< settings/ { skip = 0 }
    skip { next }
    # The loop without its comment lines (they are in the repo): user data is capped at 16 KB.
    /^# @TRAIN_LOOP@$/ {
        n = 0
        while ((getline line < loop) > 0) {
            n++
            if (n > 1 && line ~ /^[ \t]*#/ && line !~ /shellcheck/) continue
            print line
            if (n == 1) print "# scripts/ec2/train-loop.sh of the launching checkout, comment lines removed"
        }
        next
    }
    { print }
' "$here/user-data.sh" >"$user_data"
# cloud-init unpacks gzip user data; EC2's limit applies to what is sent.
gzip -9 -n -c "$user_data" >"$tmp/user-data.gz"
size=$(wc -c <"$tmp/user-data.gz")
[[ "$size" -le "$USER_DATA_MAX" ]] || die "rendered user data is $size bytes gzipped, over EC2's $USER_DATA_MAX"
for secret_var in AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_ACCESS_KEY_ID; do
    value="${!secret_var:-}"
    if [[ ${#value} -ge 8 ]] && grep -qF -- "$value" "$user_data"; then
        die "the rendered user data contains the value of $secret_var: refusing (check --extra-args)"
    fi
done

# ---------------------------------------------------------------- the aws command(s)
if [[ -z "$ROOT_DEVICE" ]]; then
    if [[ -n "$DRY_RUN" ]]; then
        ROOT_DEVICE="/dev/sda1"  # what Ubuntu-based Deep Learning AMIs use; looked up for real runs
    else
        describe=(aws ec2 describe-images --image-ids "$AMI" --query 'Images[0].RootDeviceName' --output text)
        [[ -z "$REGION" ]] || describe+=(--region "$REGION")
        ROOT_DEVICE="$("${describe[@]}")" || die "cannot describe AMI $AMI"
    fi
fi
market='{"MarketType":"spot","SpotOptions":{"SpotInstanceType":"persistent","InstanceInterruptionBehavior":"stop"}}'
disks="[{\"DeviceName\":\"$ROOT_DEVICE\",\"Ebs\":{\"VolumeSize\":$VOLUME_GB,\"VolumeType\":\"gp3\",\"DeleteOnTermination\":true}}]"
base=(aws ec2 run-instances
    --image-id "$AMI" --instance-type "$INSTANCE_TYPE"
    --instance-market-options "$market"
    --user-data "fileb://$tmp/user-data.gz"
    --metadata-options "HttpTokens=required,HttpPutResponseHopLimit=2,HttpEndpoint=enabled"
    --block-device-mappings "$disks"
    --tag-specifications "ResourceType=instance,Tags=[{Key=Name,Value=$NAME}]"
    "ResourceType=spot-instances-request,Tags=[{Key=Name,Value=$NAME}]"
    --query 'Instances[].[InstanceId,SpotInstanceRequestId,PrivateIpAddress]' --output text)
[[ -z "$REGION" ]] || base+=(--region "$REGION")
[[ -z "$SUBNET" ]] || base+=(--subnet-id "$SUBNET")
[[ ${#SECURITY_GROUPS[@]} -eq 0 ]] || base+=(--security-group-ids "${SECURITY_GROUPS[@]}")
[[ -z "$KEY_NAME" ]] || base+=(--key-name "$KEY_NAME")
if [[ -n "$PROFILE" ]]; then
    if [[ "$PROFILE" == arn:* ]]; then base+=(--iam-instance-profile "Arn=$PROFILE"); else base+=(--iam-instance-profile "Name=$PROFILE"); fi
fi
[[ -z "$PLACEMENT_GROUP" ]] || base+=(--placement "GroupName=$PLACEMENT_GROUP")

# One run-instances call per group of identical nodes: "ARGS..." as extra arguments.
if [[ "$NNODES" -gt 1 ]]; then
    groups=("--count 1 --private-ip-address $RDZV_HOST" "--count $((NNODES - 1))")
else
    groups=("--count 1")
fi

if [[ -n "$DRY_RUN" ]]; then
    printf '# ---- rendered user data (%s bytes, %s gzipped) ----\n' "$(wc -c <"$user_data")" "$size"
    cat "$user_data"
    printf '# ---- end of user data ----\n'
    [[ -z "$WHEEL" ]] || printf '# would build a wheel of %s and upload it to %s\n' "$repo" "$PROJECT_PIP_SPEC"
    printf '# would run (user data: gzip of %s):\n' "${USER_DATA_OUT:-a temporary file, keep it with --user-data-out PATH}"
    for g in "${groups[@]}"; do
        read -r -a more <<<"$g"
        printf '%q ' "${base[@]}" "${more[@]}"
        printf '\n'
    done
    exit 0
fi

command -v aws >/dev/null || die "the aws CLI is not installed (https://aws.amazon.com/cli/)"
if [[ -n "$WHEEL" ]]; then
    printf 'launch_spot: building a wheel of %s\n' "$repo" >&2
    if [[ -n "$(git -C "$repo" status --porcelain 2>/dev/null || true)" ]]; then
        printf 'launch_spot: note: the wheel includes uncommitted changes of this checkout\n' >&2
    fi
    # From a copy of the tree (tracked and untracked, not ignored files): no stale build/
    # output gets into the wheel, and nothing is written into the checkout.
    mkdir -p "$tmp/src"
    if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$repo" ls-files -z --cached --others --exclude-standard \
            | while IFS= read -r -d '' f; do if [[ -e "$repo/$f" ]]; then printf '%s\0' "$f"; fi; done \
            | (cd "$repo" && tar --null -T - -cf -) | tar -xf - -C "$tmp/src" || die "cannot copy $repo"
    else
        cp -R "$repo/." "$tmp/src" || die "cannot copy $repo"
        rm -rf "$tmp/src/build"
    fi
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/wheel" "$tmp/src" >&2 \
        || die "cannot build a wheel of $repo (needs pip and setuptools>=68 for $PYTHON; or give --project-git URL)"
    [[ -f "$tmp/wheel/$WHEEL" ]] || die "the wheel built is not $WHEEL: check pyproject.toml's version"
    aws s3 cp --only-show-errors "$tmp/wheel/$WHEEL" "$PROJECT_PIP_SPEC" >&2 \
        || die "cannot upload the wheel to $PROJECT_PIP_SPEC (credentials and s3:PutObject on the output prefix?)"
    printf 'launch_spot: uploaded %s\n' "$PROJECT_PIP_SPEC" >&2
fi
launched_ids=() launched_sirs=()
# A later node failed to launch: leave nothing behind that bills or relaunches.
clean_up_launched() {
    local aws_region=()
    [[ -z "$REGION" ]] || aws_region=(--region "$REGION")
    if [[ ${#launched_sirs[@]} -gt 0 ]]; then
        aws ec2 cancel-spot-instance-requests "${aws_region[@]}" --spot-instance-request-ids "${launched_sirs[@]}" >&2 \
            || printf 'launch_spot: could not cancel %s: cancel them by hand\n' "${launched_sirs[*]}" >&2
    fi
    if [[ ${#launched_ids[@]} -gt 0 ]]; then
        aws ec2 terminate-instances "${aws_region[@]}" --instance-ids "${launched_ids[@]}" >&2 \
            || printf 'launch_spot: could not terminate %s: terminate them by hand\n' "${launched_ids[*]}" >&2
    fi
}
for g in "${groups[@]}"; do
    read -r -a more <<<"$g"
    printf 'launch_spot: aws ec2 run-instances ... %s\n' "$g" >&2
    if ! out=$("${base[@]}" "${more[@]}"); then
        if [[ ${#launched_ids[@]} -gt 0 || ${#launched_sirs[@]} -gt 0 ]]; then
            printf 'launch_spot: launch failed: cancelling and terminating what was launched (%s)\n' \
                "${launched_ids[*]} ${launched_sirs[*]}" >&2
            clean_up_launched
        fi
        die "aws ec2 run-instances failed (see above); nothing is left running"
    fi
    printf '%s\n' "$out"
    while read -r id sir _; do
        [[ -z "$id" ]] || launched_ids+=("$id")
        [[ -z "$sir" || "$sir" == None ]] || launched_sirs+=("$sir")
    done <<<"$out"
done
cat >&2 <<EOF
launch_spot: launched. Follow training with:  journalctl -u imagenet-spot-train -f   (on the instance)
A failure it cannot get past writes ${OUTPUT%/}/ec2-status/<instance>.json and powers off (--on-fail).
When training is done, stop paying for the persistent request and the disk:
  aws ec2 cancel-spot-instance-requests --spot-instance-request-ids ${launched_sirs[*]:-<sir-...>}
  aws ec2 terminate-instances --instance-ids ${launched_ids[*]:-<i-...>}
EOF
