"""The one training config: a frozen dataclass, CLI overrides, JSON in the run folder and in
every checkpoint.

    python -m trainer --data s3://bucket/imagenet-10pct --output s3://bucket/runs/r50 --epochs 90
    torchrun --nproc_per_node=8 -m trainer --data ... --output ... --global-batch 2048

The original training script's flags keep working as aliases: --data_dir, --batch_size
(per GPU), --epochs, --lr (per 256 images), --pretrained, --resume. Defaults follow that
script (batch 256 per GPU, 90 epochs, lr 0.1 per 256 images, SGD, cosine) plus the
well-established additions of torchvision's reference recipe: label smoothing 0.1, linear
warmup, no weight decay on BN and bias parameters.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields

from common.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    data: str
    output: str = "outputs"
    arch: str = "resnet50"
    epochs: int = 90
    batch_size: int = 256              # per process (GPU), per micro-batch
    global_batch: int | None = None    # default: batch_size * world size (then accum = 1)
    lr: float = 0.1                    # per 256 images; scaled by global_batch / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 5.0
    image_size: int = 224
    val_resize: int | None = None      # default: round(image_size / 0.875), 256 for 224 (resolved on creation)
    color_jitter: float = 0.0          # the original script used 0.4 (brightness/contrast/saturation)
    workers: int = 8                   # DataLoader workers per process
    cache_dir: str | None = None
    decode: str = "cpu"                # cpu (workers decode) | gpu (nvJPEG on the training device; trainer.gpu_decode)
    amp: str = "auto"                  # auto | bf16 | fp16 | off
    compile: bool = False
    channels_last: bool = True
    zero_init_residual: bool = False
    pretrained: str | None = None      # "torchvision" (hub cache) or a weights file
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"               # auto | cpu | cuda
    resume: str = "auto"               # auto | none | PATH/URL
    overwrite: bool = False
    checkpoint_interval_minutes: float = 15.0
    checkpoint_every_steps: int = 0    # also checkpoint every N optimizer steps (0 = off)
    keep_last: int = 5
    local_dir: str | None = None       # staging for an s3:// output (default: a temp folder)
    limit_train_steps: int = 0         # stop each epoch after N steps (smoke tests, benchmarks)
    log_every_steps: int = 50          # read the running loss/top-1 from the device and log them every N steps
    check_sync_every: int = 0          # compare a weight checksum across ranks every N steps (0 = off)
    sample_log: bool = False           # write the keys of every step's samples (audit, elastic tests)
    imds_poll_seconds: float = 5.0
    hang_timeout_minutes: float = 15.0      # no step / eval batch for this long: stacks to the log, exit 76
    hang_first_step_minutes: float = 30.0   # the first step (and first evaluation) after a start or resume
    lease_seconds: float = 300.0       # single-writer lease on --output: taken over when not renewed this long

    def __post_init__(self) -> None:
        if self.val_resize is None:  # the value used is what config.json and the checkpoints record
            object.__setattr__(self, "val_resize", default_val_resize(self.image_size))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def check(self) -> None:
        for name in ("epochs", "batch_size", "image_size", "val_resize"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.val_resize < self.image_size:
            raise UserError(f"--val-resize {self.val_resize} is smaller than --image-size {self.image_size}: the "
                            "val images are resized to --val-resize, then center-cropped to --image-size: pass a larger "
                            "--val-resize, or leave it out (default: --image-size / 0.875)")
        if self.global_batch is not None and self.global_batch < 1:
            raise UserError(f"--global-batch must be positive, got {self.global_batch}")
        if self.log_every_steps < 0:
            raise UserError(f"--log-every-steps must be >= 0, got {self.log_every_steps}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise UserError(f"--amp must be auto, bf16, fp16 or off, got {self.amp}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device}")
        if self.lease_seconds <= 0:
            raise UserError(f"--lease-seconds must be positive, got {self.lease_seconds:g}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        for name in ("hang_timeout_minutes", "hang_first_step_minutes"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0 (0 turns the hang watchdog off), "
                                f"got {getattr(self, name)}")


def default_val_resize(image_size: int) -> int:
    """The eval resize before the center crop: the 224/256 ratio of the reference recipe."""
    return round(image_size / 0.875)


def _bool_flag(p: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=default,
                   help=help)


def build_parser() -> argparse.ArgumentParser:
    """The CLI: model, data and optimisation flags here, run-folder flags in _add_run_args."""
    d = {f.name: f.default for f in fields(TrainConfig)}
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    p.add_argument("--data", "--data_dir", "--data-dir", dest="data", required=True,
                   help="shard build: local folder or s3:// URL holding manifest.json")
    p.add_argument("--output", "--output-dir", "--output_dir", dest="output", default=d["output"],
                   help="run folder: local or s3://")
    p.add_argument("--arch", default=d["arch"], help="any torchvision classification model name")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", "--batch_size", "-b", dest="batch_size", type=int, default=d["batch_size"],
                   help="per GPU (per process) micro-batch")
    p.add_argument("--global-batch", dest="global_batch", type=int, default=None,
                   help="target global batch; reached with gradient accumulation on fewer GPUs")
    p.add_argument("--lr", type=float, default=d["lr"], help="learning rate per 256 images")
    p.add_argument("--momentum", type=float, default=d["momentum"])
    _bool_flag(p, "nesterov", d["nesterov"], "Nesterov momentum")
    p.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float, default=d["weight_decay"])
    p.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=d["label_smoothing"])
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=d["warmup_epochs"])
    p.add_argument("--image-size", dest="image_size", type=int, default=d["image_size"])
    p.add_argument("--val-resize", dest="val_resize", type=int, default=None,
                   help="val: shorter side resized to this, then center crop --image-size "
                        "(default: round(image size / 0.875), 256 for 224)")
    p.add_argument("--color-jitter", dest="color_jitter", type=float, default=d["color_jitter"])
    p.add_argument("--workers", "-j", dest="workers", type=int, default=d["workers"])
    p.add_argument("--cache-dir", dest="cache_dir", default=None, help="local shard cache (write-through)")
    p.add_argument("--decode", default=d["decode"], choices=["cpu", "gpu"],
                   help="JPEG decode + crop/resize in the DataLoader workers (cpu) or batched on the training "
                        "device (gpu: nvJPEG on CUDA; on a CPU device the same code path with torchvision's decoder)")
    p.add_argument("--amp", default=d["amp"], choices=["auto", "bf16", "fp16", "off"])
    _bool_flag(p, "compile", d["compile"], "torch.compile the model")
    _bool_flag(p, "channels-last", d["channels_last"], "channels_last memory format")
    _bool_flag(p, "zero-init-residual", d["zero_init_residual"], "zero-init the last BN of each residual block")
    p.add_argument("--pretrained", nargs="?", const="torchvision", default=None,
                   help="start from torchvision's ImageNet weights (hub cache) or the given weights file")
    p.add_argument("--seed", type=int, default=d["seed"])
    _bool_flag(p, "deterministic", d["deterministic"], "deterministic algorithms (bitwise-reproducible on CPU)")
    p.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"])
    _add_run_args(p, d)
    return p


def _add_run_args(p: argparse.ArgumentParser, d: dict) -> None:
    """Flags about the run folder, checkpoints, logging and fault handling."""
    p.add_argument("--resume", nargs="?", const="auto", default=d["resume"],
                   help="auto (newest complete checkpoint under --output), none, or a checkpoint path/URL")
    p.add_argument("--overwrite", action="store_true", help="with --resume none: start over in a used --output")
    p.add_argument("--checkpoint-interval-minutes", dest="checkpoint_interval_minutes", type=float,
                   default=d["checkpoint_interval_minutes"])
    p.add_argument("--checkpoint-every-steps", dest="checkpoint_every_steps", type=int,
                   default=d["checkpoint_every_steps"])
    p.add_argument("--keep-last", dest="keep_last", type=int, default=d["keep_last"])
    p.add_argument("--local-dir", dest="local_dir", default=None, help="local staging folder for an s3:// output")
    p.add_argument("--limit-train-steps", dest="limit_train_steps", type=int, default=0)
    p.add_argument("--log-every-steps", "--log-interval", dest="log_every_steps", type=int,
                   default=d["log_every_steps"],
                   help="log rank 0's running loss/top-1 every N optimizer steps (0: only per epoch); each "
                        "log reads from the device, so not every step")
    p.add_argument("--check-sync-every", dest="check_sync_every", type=int, default=0,
                   help="every N steps, fail if the ranks' weights differ (a DDP consistency check)")
    p.add_argument("--sample-log", dest="sample_log", action="store_true",
                   help="write each step's sample keys to LOCAL_DIR/samples/epochNNN_rankR.jsonl")
    p.add_argument("--imds-poll-seconds", dest="imds_poll_seconds", type=float, default=d["imds_poll_seconds"])
    p.add_argument("--hang-timeout-minutes", dest="hang_timeout_minutes", type=float,
                   default=d["hang_timeout_minutes"],
                   help="if no optimizer step (or eval batch) completes for this long, log every thread's stack "
                        "and exit 76 so the restart loop resumes from the last checkpoint (0 = off)")
    p.add_argument("--hang-first-step-minutes", dest="hang_first_step_minutes", type=float,
                   default=d["hang_first_step_minutes"],
                   help="the same allowance for the first step and the first evaluation after a start or resume "
                        "(compilation, cache warm-up)")
    p.add_argument("--lease-seconds", dest="lease_seconds", type=float, default=d["lease_seconds"],
                   help="one trainer per --output: another may take over a lease not renewed this long (renewed "
                        "every third of it)")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    cfg.check()
    return cfg
