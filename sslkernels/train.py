"""The trainer behind ``python -m sslkernels train``: one method, one dataset, checkpoints that
resume to the same losses and the same log, and a linear probe against the randomly initialized
encoder.

Every random draw after model initialization is a function of (seed, step) or (seed, epoch): the
epoch's shuffle and each step's augmentations. A checkpoint therefore only has to hold the
module, optimizer and scheduler states (EMA targets and the queue are module buffers) and the
step, and a resumed run reproduces the uninterrupted one exactly. ``metrics.jsonl`` is made
durable with every checkpoint and cut back to the checkpoint's step on ``--resume``
(:mod:`sslkernels.metrics_log`), so the resumed log equals the uninterrupted one too.

Everything is checked before anything is written: a bad option, a ``--data`` folder that is
not one, a checkpoint that is truncated, corrupt or of a differently configured run all end as a
one-line ``error:`` (exit status 2) and leave the output directory as it was.

Under ``torchrun --nproc_per_node=W`` each process trains on its slice of every global batch of
``--batch-size`` images (:class:`sslkernels.distributed.Ranks`); rank 0 alone logs, checkpoints
and probes.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import _cli
from . import augment as A
from . import methods as M
from ._cli import UsageError
from .checkpoint import FORMAT, config_differences, load_checkpoint, save_checkpoint
from .data import ImageFolderUint8, SyntheticShapes
from .distributed import Ranks
from .evaluate import MEAN, STD, knn_accuracy, linear_probe, probe  # noqa: F401 (re-exported)
from .metrics_log import MetricsLog, check_resumable
from .monitor import CollapseMonitor
from .progress import Progress

METHODS = ("simclr", "simclrv2", "mocov2", "byol", "simsiam")

# Augmentation recipe of each method, from the official code (sslkernels.augment: SimCLR's
# data_util.py, MoCo v2's --aug-plus, which SimSiam reuses, and BYOL's asymmetric views).
RECIPES = {"simclr": "simclr", "simclrv2": "simclr", "mocov2": "moco_v2", "byol": "byol",
           "simsiam": "simsiam"}
DEFAULT_EPOCHS = {"simclr": 15, "simclrv2": 15, "mocov2": 15, "byol": 60, "simsiam": 30}
# BYOL is trained with LARS in the paper, and on the default dataset it learns more with it (32%
# vs 28% linear); the others use SGD as their official code does.
DEFAULT_OPTIMIZER = {"simclr": "sgd", "simclrv2": "sgd", "mocov2": "sgd", "byol": "lars",
                     "simsiam": "sgd"}
# SimCLR at the paper's CIFAR temperature (0.5; 0.1-0.2 needs large batches); MoCo v2's 0.2.
DEFAULT_TEMPERATURE = {"simclr": 0.5, "simclrv2": 0.5, "mocov2": 0.2}
EMA_METHODS = ("simclrv2", "mocov2", "byol")
DEFAULT_QUEUE = {"mocov2": 2048, "simclrv2": 0}
SCHEDULES = ("cosine", "step")
# MoCo v1's step schedule: x0.1 at epochs 120 and 160 of 200.
STEP_MILESTONES = (0.6, 0.8)

# The options that define a run. A resumed run must agree on all of them; the rest (device,
# workers, output and checkpoint cadence, probe, verbosity) may change between sessions.
CONFIG_KEYS = ("method", "data", "train_size", "image_size", "backbone", "width", "epochs",
               "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs", "schedule",
               "amp", "seed", "queue_size", "momentum", "temperature", "recipe", "min_scale",
               "per_image_augment", "no_mlp", "no_stop_grad", "processes")


def default_lr(method: str, optimizer: str) -> float:
    """Base learning rate per 256 images."""
    if optimizer == "lars" and method in ("simclr", "simclrv2", "byol"):
        return 1.0
    return 0.2 if method == "simsiam" else 0.5


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or _cli.ArgumentParser(prog="python -m sslkernels train")
    pos, at_least = _cli.float_in, _cli.int_at_least
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--data", default=None,
                   help="image folder (ImageFolder layout); default: the embedded synthetic "
                        "shapes dataset (no download)")
    p.add_argument("--image-size", type=at_least(16), default=32)
    p.add_argument("--backbone", default="small", choices=("small", "resnet18", "resnet50"),
                   help="small: a 4-block convnet; resnet*: torchvision ResNet (small-image stem "
                        "below 96 px)")
    p.add_argument("--width", type=_cli.int_multiple_of(4), default=64,
                   help="small backbone: channels of its last two blocks")
    p.add_argument("--epochs", type=at_least(1), default=None,
                   help="default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())
                        + " (without negatives BYOL and SimSiam learn more slowly)")
    p.add_argument("--batch-size", type=at_least(2, " (BatchNorm needs 2 samples)"),
                   default=128)
    p.add_argument("--optimizer", choices=("sgd", "lars"), default=None,
                   help="default: lars for byol, sgd for the others")
    p.add_argument("--lr", type=pos(0, lo_open=True), default=None,
                   help="base learning rate per 256 images (default: 0.5 SimCLR, MoCo v2 and "
                        "BYOL, 1.0 SimCLR and BYOL with LARS; 0.2 SimSiam)")
    p.add_argument("--weight-decay", type=pos(0), default=5e-4)
    p.add_argument("--warmup-epochs", type=pos(0), default=1.0)
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning rate after warm-up: cosine decay, or MoCo v1's steps (x0.1 at "
                        "60%% and 80%% of training)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--device", type=_cli.device, default=_cli.default_device())
    p.add_argument("--seed", type=_cli.seed, default=0)
    p.add_argument("--train-size", type=at_least(1), default=4000,
                   help="synthetic dataset: images")
    p.add_argument("--workers", type=at_least(0), default=0)
    p.add_argument("--out", default="runs/{method}", help="output directory")
    p.add_argument("--checkpoint-every", type=at_least(1), default=50,
                   help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that already holds a run")
    p.add_argument("--stop-after", type=at_least(1), default=None,
                   help="stop (with a checkpoint) after this many steps in total")
    p.add_argument("--queue-size", type=at_least(0), default=None,
                   help="MoCo v2: queue K (default 2048); SimCLR v2: size of the memory of "
                        "negatives from an EMA network (default 0: none; on the default "
                        "dataset 2048 collapses, see the README)")
    p.add_argument("--momentum", type=pos(0, 1), default=None,
                   help="EMA momentum of MoCo v2's key encoder, SimCLR v2's memory network and "
                        "BYOL's target (its base value) (default 0.99; the papers' 0.999 and "
                        "0.996 are tuned for hundreds of ImageNet epochs)")
    p.add_argument("--temperature", type=pos(0, lo_open=True), default=None,
                   help="InfoNCE temperature (simclr, simclrv2: 0.5; mocov2: 0.2)")
    p.add_argument("--recipe", choices=tuple(A.RECIPES), default=None,
                   help="augmentation recipe (default: the method's own; moco_v1 is MoCo v2's "
                        "ablation without blur)")
    p.add_argument("--no-mlp", action="store_true",
                   help="mocov2: MoCo v1's linear head instead of the MLP (the paper's ablation)")
    p.add_argument("--no-stop-grad", action="store_true",
                   help="simsiam: no stop-gradient (the paper's ablation: collapses)")
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--min-scale", type=pos(0, 1, lo_open=True), default=None,
                   help="smallest crop area fraction (default: 0.4 for images below 64 px, "
                        "else the recipe's 0.08 or 0.2)")
    p.add_argument("--per-image-augment", action="store_true",
                   help="torchvision v2 image by image instead of the batched augmentation")
    p.add_argument("--quiet", action="store_true")
    return p


def resolve(args, world: int = 1) -> dict:
    """The run's configuration (:data:`CONFIG_KEYS`) with the per-method defaults filled in;
    :class:`UsageError` for options that do not fit together. Writes nothing."""
    m = args.method
    if args.no_mlp and m != "mocov2":
        raise UsageError(f"--no-mlp applies to --method mocov2 (MoCo's head), not {m}")
    if args.no_stop_grad and m != "simsiam":
        raise UsageError(f"--no-stop-grad applies to --method simsiam, not {m}")
    if args.momentum is not None and m not in EMA_METHODS:
        raise UsageError(f"--momentum applies to the methods with an EMA network "
                         f"({', '.join(EMA_METHODS)}), not {m}")
    if args.temperature is not None and m not in DEFAULT_TEMPERATURE:
        raise UsageError(f"--temperature applies to the contrastive methods "
                         f"({', '.join(DEFAULT_TEMPERATURE)}), not {m}")
    if m == "mocov2" and args.queue_size is not None and args.queue_size < 1:
        raise UsageError("--queue-size must be >= 1 for mocov2 (the queue of negatives), got "
                         f"{args.queue_size}")
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of the number of "
                         f"processes ({world}): it is the global batch")
    if args.batch_size // world < 2:
        raise UsageError(f"--batch-size {args.batch_size} over {world} processes leaves fewer "
                         f"than 2 images per process (BatchNorm needs 2)")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in OUT, --overwrite replaces it: pick one")
    optimizer = args.optimizer or DEFAULT_OPTIMIZER[m]
    cfg = {k: getattr(args, k, None) for k in CONFIG_KEYS}
    cfg.update(epochs=args.epochs or DEFAULT_EPOCHS[m], optimizer=optimizer,
               lr=args.lr if args.lr is not None else default_lr(m, optimizer),
               temperature=(args.temperature if args.temperature is not None
                            else DEFAULT_TEMPERATURE.get(m)),
               momentum=((args.momentum if args.momentum is not None else 0.99)
                         if m in EMA_METHODS else None),
               recipe=args.recipe or RECIPES[m],
               min_scale=(args.min_scale if args.min_scale is not None
                          else default_min_scale(args.image_size)),
               data=os.path.abspath(args.data) if args.data is not None else None,
               train_size=args.train_size if args.data is None else None,
               width=args.width if args.backbone == "small" else None,
               queue_size=(args.queue_size if args.queue_size is not None else
                           DEFAULT_QUEUE[m]) if m in DEFAULT_QUEUE else None,
               processes=world)
    return cfg


# ---------------------------------------------------------------------------------------------
# Pieces

def make_backbone(name: str, image_size: int, width: int | None = 64) -> tuple[nn.Module, int]:
    if name == "small":
        net = M.SmallConvNet(width)
        return net, net.width
    return M.resnet_backbone(name, small_images=image_size < 96)


def make_method(cfg: dict, backbone: nn.Module, width: int) -> nn.Module:
    # Sized for runs of a few hundred steps: MoCo's and BYOL's targets (and SimCLR v2's memory
    # network) default to a lower momentum (cfg["momentum"], 0.99) than the papers' 0.999 /
    # 0.996, which are tuned for hundreds of ImageNet epochs and would leave the target almost
    # at its random initialization here.
    name, t, m = cfg["method"], cfg["temperature"], cfg["momentum"]
    if name == "simclr":  # SimCLR v1: Linear-ReLU-Linear
        return M.SimCLR(backbone, width, proj_hidden=512, proj_dim=128, proj_layers=2,
                        temperature=t)
    if name == "simclrv2":
        return M.SimCLRv2(backbone, width, proj_hidden=512, proj_dim=128, proj_layers=3,
                          temperature=t, memory_size=cfg["queue_size"], momentum=m)
    if name == "mocov2":
        return M.MoCoV2(backbone, width, dim=128, mlp_hidden=512, queue_size=cfg["queue_size"],
                        momentum=m, temperature=t,
                        head="linear" if cfg["no_mlp"] else "mlp")
    if name == "byol":
        return M.BYOL(backbone, width, proj_hidden=1024, proj_dim=256, pred_hidden=1024,
                      base_momentum=m)
    return M.SimSiam(backbone, width, dim=512, pred_dim=128,
                     stop_gradient=not cfg["no_stop_grad"])


def build_method(cfg: dict) -> nn.Module:
    """The method of a configuration, freshly initialized from the global generator."""
    backbone, width = make_backbone(cfg["backbone"], cfg["image_size"], cfg["width"])
    return make_method(cfg, backbone, width)


def default_min_scale(image_size: int) -> float | None:
    """Below 64 px the recipes' smallest crops (8% or 20% of the area: 9 or 14 px of a 32-px
    image) hold a sliver of one shape and little else, so views of one image would share too
    little to learn from in a short run; 40% keeps most of a shape in every crop."""
    return 0.4 if image_size < 64 else None


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio ``eta * ||w|| / ||g + wd w||`` (You et al.
    2017), skipping biases and BatchNorm parameters (1-d), as SimCLR and BYOL do."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    wn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((wn > 0) & (dn > 0), group["eta"] * wn / dn,
                                        torch.ones_like(wn))
                    d = d.mul(trust)
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def make_optimizer(method: nn.Module, opt_name: str, lr: float, wd: float):
    if isinstance(method, M.SimSiam):
        groups = method.parameter_groups()
    else:
        groups = [{"params": [p for p in method.parameters() if p.requires_grad],
                   "fix_lr": False}]
    if opt_name == "lars":
        return LARS(groups, lr=lr, weight_decay=wd)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> float:
    """The learning-rate multiplier of ``step`` (0-based): linear warm-up, then cosine decay to
    0, or MoCo v1's steps (x0.1 at 60% and 80% of ``total_steps``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return 0.1 ** sum(step >= m * total_steps for m in STEP_MILESTONES)
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def lr_schedule(optimizer, warmup_steps: int, total_steps: int, schedule: str = "cosine"):
    factor = lambda s: lr_factor(s, warmup_steps, total_steps, schedule)  # noqa: E731
    lambdas = [(lambda s: 1.0) if g.get("fix_lr") else factor for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _view_transform(c: A.ViewConfig):
    """torchvision v2 equivalent of one view's config, applied image by image."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(c.size, scale=c.scale, ratio=c.ratio, antialias=True),
             v2.RandomHorizontalFlip(c.flip_p),
             v2.RandomApply([v2.ColorJitter(*c.jitter)], p=c.jitter_p),
             v2.RandomGrayscale(p=c.gray_p),
             v2.RandomApply([v2.GaussianBlur(c.kernel_size, sigma=c.blur_sigma)], p=c.blur_p),
             v2.ToDtype(torch.float32, scale=True),
             v2.RandomSolarize(c.solarize_threshold, p=c.solarize_p),
             v2.Normalize(c.mean, c.std)]
    return v2.Compose(steps)


class Views:
    """Two augmented views of a uint8 batch (or list of images): the library's batched
    augmentation op (:class:`sslkernels.augment.TwoViews`, per-sample parameters), or
    torchvision image by image (``per_image=True``). Every draw comes from a generator seeded by
    (seed, step), so a resumed run draws exactly what the uninterrupted one drew.

    ``recipe``: a recipe of :data:`sslkernels.augment.RECIPES`, or a method name (its recipe).
    ``min_scale`` replaces the lower end of the recipe's crop-area range (both views).
    """

    def __init__(self, recipe: str, size: int, seed: int, per_image: bool = False,
                 min_scale: float | None = None, channels_last: bool = False):
        recipe = RECIPES.get(recipe, recipe)
        if recipe not in A.RECIPES:
            raise ValueError(f"recipe must be one of {tuple(A.RECIPES)} or a method "
                             f"{METHODS}, got {recipe!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        configs = A.RECIPES[recipe](size, mean=MEAN, std=STD, channels_last=channels_last)
        if min_scale is not None:
            if not 0 < min_scale <= 1:
                raise ValueError(f"--min-scale must be in (0, 1], got {min_scale}")
            configs = tuple(c.replace(scale=(min_scale, 1.0)) for c in configs)
        self.configs, self.size, self.seed, self.per_image = configs, size, seed, per_image
        self.two_views = A.TwoViews(*configs)
        if per_image:
            self.transforms = [_view_transform(c) for c in configs]

    def __call__(self, images, step: int, device: torch.device):
        if self.per_image:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + step)
                views = [torch.stack([t(im) for im in images]) for t in self.transforms]
            return tuple(v.to(device, non_blocking=True) for v in views)
        # Packed on the host (a view of a batch, one copy of a list), then one transfer.
        packed = A.pack_images(images)
        images = A.Packed(packed.data.to(device, non_blocking=True),
                          packed.meta.to(device, non_blocking=True), packed.sizes)
        # sample_params draws on the CPU whatever the device, so CPU and GPU runs with one seed
        # see the same crops and colours
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        out = self.two_views(images, generator=g)
        return out.view1, out.view2


@dataclass
class Data:
    train: torch.utils.data.Dataset
    held_out: torch.utils.data.Dataset
    classes: list


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _materialize(ds) -> _Tensors:
    items = [ds[i] for i in range(len(ds))]
    return _Tensors(torch.stack([im for im, _ in items]), torch.tensor([l for _, l in items]),
                    ds.classes)


def make_data(cfg: dict) -> Data:
    """The training and held-out splits of a configuration (``data``, ``train_size``,
    ``image_size``, ``seed``): the synthetic shapes, or a random fifth of an image folder held
    out. :class:`UsageError` for a folder that is not an image folder."""
    if cfg["data"] is None:
        train = _materialize(SyntheticShapes(cfg["train_size"], cfg["image_size"],
                                             seed=cfg["seed"]))
        held = _materialize(SyntheticShapes(max(500, cfg["train_size"] // 4),
                                            cfg["image_size"], seed=cfg["seed"] + 7919))
        return Data(train, held, train.classes)
    root = cfg["data"]
    if not os.path.isdir(root):
        raise UsageError(f"--data {root}: no such directory")
    try:
        full = ImageFolderUint8(root)
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise UsageError(f"--data {root}: not an image folder (root/class/image.jpg): "
                         f"{str(e).splitlines()[0]}") from None
    if len(full) < 2:
        raise UsageError(f"--data {root}: {len(full)} image(s); at least 2 are needed (one "
                         f"fifth is held out)")
    g = torch.Generator().manual_seed(cfg["seed"])
    perm = torch.randperm(len(full), generator=g).tolist()
    cut = max(1, len(full) // 5)
    held = torch.utils.data.Subset(full, perm[:cut])
    train = torch.utils.data.Subset(full, perm[cut:])
    return Data(train, held, full.classes)


def _batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


def out_dir(args) -> str:
    return args.out.format(method=args.method)


def check_out_dir(out: str, resume: bool, overwrite: bool) -> None:
    """An output directory that can be written, and no finished or half-done run in it unless
    ``--resume`` or ``--overwrite`` says what to do with it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    parent = out
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent or ".", os.W_OK):
        raise UsageError(f"--out {out}: {parent or '.'} is not writable")
    ckpt = os.path.join(out, "checkpoint.pt")
    if not resume and not overwrite and os.path.exists(ckpt):
        raise UsageError(f"{out} already holds a run ({ckpt}): add --resume to continue it, "
                         f"--overwrite to start over, or pick another --out")


# ---------------------------------------------------------------------------------------------
# Figure

def plot(path: str, losses: list[float], steps_per_epoch: int, acc: dict,
         stds: list[float] | None = None, dim: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if stds else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    x = [(i + 1) / steps_per_epoch for i in range(len(losses))]
    a, b = axes[0], axes[-1]
    a.plot(x, losses, lw=1)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.set_title("loss")
    if stds:
        c = axes[1]
        c.plot(x[:len(stds)], stds, lw=1)
        if dim:
            c.axhline(dim ** -0.5, ls="--", color="#999", lw=1, label="1/sqrt(d)")
            c.legend(fontsize=8)
        c.set_ylim(bottom=0)
        c.set_xlabel("epoch")
        c.set_title("std of normalized embeddings (collapse: 0)")
    names = ["random init\nlinear", "trained\nlinear", "random init\nkNN", "trained\nkNN"]
    vals = [acc["random"]["linear"], acc["trained"]["linear"], acc["random"]["knn"],
            acc["trained"]["knn"]]
    b.bar(names, [100 * v for v in vals], color=["#999", "#2a6", "#bbb", "#4c8"])
    for i, v in enumerate(vals):
        b.text(i, 100 * v + 1, f"{100 * v:.1f}", ha="center")
    b.set_ylim(0, 105)
    b.set_ylabel("held-out accuracy (%)")
    b.set_title("probe")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def train(args) -> dict:
    """Runs ``python -m sslkernels train`` for parsed ``args``; returns the result dict.

    Raises :class:`sslkernels._cli.UsageError` (a ``ValueError``), with nothing written, for
    bad options, data or checkpoints."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = resolve(args, world)
    out = out_dir(args)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    log_path = os.path.join(out, "metrics.jsonl")
    check_out_dir(out, args.resume, args.overwrite)
    state = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise UsageError(f"--resume: no checkpoint at {ckpt_path} (drop --resume to start "
                             f"a run there)")
        remedy = f"start over with --overwrite (or --out another directory)"
        state = load_checkpoint(ckpt_path, "train", remedy, map_location="cpu")
        diffs = config_differences(state["config"], cfg)
        if diffs:
            raise UsageError(f"{ckpt_path} is a run with other options: " + "; ".join(diffs)
                             + " - resume with the checkpoint's options, or use another --out")
        check_resumable(log_path, state["log_bytes"], state["step"])
    data = make_data(cfg)
    steps_per_epoch = len(data.train) // cfg["batch_size"]
    if steps_per_epoch < 1:
        raise UsageError(f"--batch-size {cfg['batch_size']} is larger than the training set "
                         f"({len(data.train)} images)")
    total = steps_per_epoch * cfg["epochs"]

    ranks = Ranks.from_env(args.device, cfg["batch_size"])
    device = ranks.device(args.device)
    torch.manual_seed(cfg["seed"])
    # channels-last convolutions are ~1.5x faster on CPU; the augmentation op writes the views
    # in that layout directly
    method = build_method(cfg).to(device, memory_format=torch.channels_last)
    random_backbone = copy.deepcopy(method.backbone)  # the baseline the probe compares with
    lr = cfg["lr"] * cfg["batch_size"] / 256
    optimizer = make_optimizer(method, cfg["optimizer"], lr, cfg["weight_decay"])
    step_fn = ranks.wrap(method)
    scheduler = lr_schedule(optimizer, int(cfg["warmup_epochs"] * steps_per_epoch), total,
                            cfg["schedule"])
    views = Views(cfg["recipe"], cfg["image_size"], cfg["seed"],
                  per_image=cfg["per_image_augment"], min_scale=cfg["min_scale"],
                  channels_last=True)
    step, losses, stds, seconds = 0, [], [], 0.0
    if state is not None:
        try:
            method.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            random_backbone.load_state_dict(state["random_backbone"])
        except (RuntimeError, KeyError, ValueError) as e:
            ranks.close()
            raise UsageError(f"{ckpt_path} does not fit the model its options build "
                             f"({str(e).splitlines()[0][:200]}); start over with "
                             f"--overwrite") from None
        step, losses, stds = state["step"], state["losses"], state["stds"]
        seconds = state["seconds"]

    # Nothing has been written so far; from here on the run owns OUT.
    if ranks.main:
        os.makedirs(out, exist_ok=True)
    log = MetricsLog(log_path if ranks.main else None,
                     truncate_to=state["log_bytes"] if state is not None else None)
    monitor = CollapseMonitor(method.projector)
    clock = time.perf_counter()

    def checkpoint():
        if not ranks.main:
            return
        # the log first: a checkpoint must never hold steps that its log has lost
        nbytes = log.sync()
        save_checkpoint(ckpt_path, {
            "format": FORMAT, "kind": "train", "method": cfg["method"], "config": cfg,
            "model": method.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "random_backbone": random_backbone.state_dict(),
            "step": step, "losses": losses, "stds": stds, "log_bytes": nbytes,
            "seconds": seconds + time.perf_counter() - clock, "args": _plain(vars(args))})

    stop_at = total if args.stop_after is None else min(total, args.stop_after)
    progress = Progress(total, steps_per_epoch, initial=step,
                        enabled=not args.quiet and ranks.main, desc=cfg["method"])
    t_start, seen = time.perf_counter(), 0
    method.train()
    try:
        while step < stop_at:
            epoch, first = divmod(step, steps_per_epoch)
            loader = torch.utils.data.DataLoader(
                data.train, batch_sampler=[ranks.slice(b) for b in _batches(
                    len(data.train), cfg["batch_size"], cfg["seed"], epoch)[first:]],
                collate_fn=A.uint8_collate, num_workers=args.workers)
            for images, _ in loader:
                t0 = time.perf_counter()
                ranks.seed_step(cfg["seed"], step)
                monitor.reset()
                v = views(images, ranks.augment_key(step), device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"]):
                    loss = step_fn(v)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                method.after_optimizer_step(step, total)
                step += 1
                losses.append(ranks.mean(loss.detach()).item())
                std = monitor.value()
                stds.append(ranks.mean(torch.tensor(std, device=device)).item()
                            if ranks.world > 1 else std)
                n_images = len(images) * ranks.world
                seen += n_images
                ips = n_images / (time.perf_counter() - t0)
                log.write({"step": step, "epoch": step / steps_per_epoch, "loss": losses[-1],
                           "lr": optimizer.param_groups[0]["lr"], "embedding_std": stds[-1],
                           "images_per_s": ips,
                           "seconds": seconds + time.perf_counter() - clock})
                progress.update(step, losses[-1], n_images, std=stds[-1])
                if step % args.checkpoint_every == 0 or step == stop_at:
                    checkpoint()
                if step >= stop_at:
                    break
    except KeyboardInterrupt:
        progress.close()
        checkpoint()
        log.close()
        if ranks.main:
            print(f"\ninterrupted at step {step}; checkpoint saved to {ckpt_path} "
                  f"(continue with --resume)", file=sys.stderr)
        raise
    finally:
        monitor.remove()
        progress.close()
    log.close()
    elapsed = time.perf_counter() - t_start
    dim = [m for m in method.projector.modules() if isinstance(m, nn.Linear)][-1].out_features
    result = {"method": cfg["method"], "config": cfg, "steps": step, "losses": losses,
              "embedding_std": stds[-1] if stds else None, "embedding_dim": dim,
              "seconds": elapsed,
              "seconds_per_epoch": elapsed / max(1e-9, seen / len(data.train))}
    if step >= total and ranks.main:
        if not args.no_probe:
            acc = {"random": probe(random_backbone, data.train, data.held_out,
                                   len(data.classes), cfg["image_size"], device),
                   "trained": probe(method.backbone, data.train, data.held_out,
                                    len(data.classes), cfg["image_size"], device)}
            result["probe"] = acc
            plot(os.path.join(out, "curves.png"), losses, steps_per_epoch, acc, stds, dim)
            print(f"{cfg['method']}: linear probe {100 * acc['trained']['linear']:.1f}% "
                  f"(random init {100 * acc['random']['linear']:.1f}%), kNN "
                  f"{100 * acc['trained']['knn']:.1f}% (random init "
                  f"{100 * acc['random']['knn']:.1f}%), embedding std {stds[-1]:.4f} "
                  f"(1/sqrt(d) = {dim ** -0.5:.4f}), "
                  f"{result['seconds_per_epoch']:.1f} s/epoch")
        with open(os.path.join(out, "results.json"), "w") as f:
            import json

            json.dump({k: v for k, v in result.items() if k != "losses"}, f, indent=2)
    ranks.close()
    return result


def _plain(d: dict) -> dict:
    """Only the values ``torch.load(weights_only=True)`` reads back."""
    return {k: v for k, v in d.items() if v is None or isinstance(v, (str, int, float, bool))}


def main(argv=None) -> int:
    parser = build_parser()
    return _cli.run_command(parser, train, parser.parse_args(argv))
