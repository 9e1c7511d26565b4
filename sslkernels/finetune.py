"""``python -m sslkernels finetune``: SimCLR v2's second stage. Fine-tunes a pretrained run's
encoder, end to end, together with the first ``--head-layer`` layers of its projection head and
a new linear classifier, on a class-balanced labelled fraction of the training set, and reports
held-out accuracy (Chen et al. 2020b, Sec. 2.2: fine-tuning "from the middle" of the head,
``--head-layer 1``, beats fine-tuning from the encoder output, ``--head-layer 0``, most with few
labels).

``--random-init`` trains the same architecture from its random initialization on the same
labelled images with the same recipe: the supervised baseline. The pretrained encoder's linear
probe on the same labelled images (frozen features) is reported alongside.

The fine-tuned model is saved (``model.pt``) as the teacher for ``distill``
(:mod:`sslkernels.distill`). Fine-tuning augments with random crops and flips only, as the
paper does; every draw is a function of (``--label-seed``, step).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import _cli
from . import augment as A
from ._cli import UsageError
from .checkpoint import FORMAT, load_checkpoint, save_checkpoint
from .evaluate import MEAN, STD, accuracy, probe
from .methods.heads import head_blocks
from .metrics_log import MetricsLog
from .progress import Progress


class Classifier(nn.Module):
    """``backbone`` -> ``head`` (the kept projection-head layers, possibly none: an empty
    Sequential is the identity) -> ``fc``."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, fc: nn.Linear):
        super().__init__()
        self.backbone, self.head, self.fc = backbone, head, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.backbone(x)))


def head_width(blocks: list[nn.Sequential], feature_dim: int) -> int:
    """Output width of ``blocks`` (the kept head layers) on top of a ``feature_dim`` encoder."""
    return blocks[-1][0].out_features if blocks else feature_dim


def pretrained_classifier(state: dict, head_layer: int, classes: int, pretrained: bool = True):
    """The classifier of a ``train`` checkpoint: its encoder and the first ``head_layer`` layers
    of its projection head (``pretrained=False``: the same modules at the run's random
    initialization), then a new linear layer to ``classes``."""
    from .train import build_method, make_backbone

    cfg = state["config"]
    torch.manual_seed(cfg["seed"])
    method = build_method(cfg)
    if pretrained:
        method.load_state_dict(state["model"])
    blocks = head_blocks(method.projector)
    if not 0 <= head_layer <= len(blocks):
        raise UsageError(f"--head-layer must be in [0, {len(blocks)}] for this {cfg['method']} "
                         f"run (its projection head has {len(blocks)} layers), got {head_layer}")
    _, feature_dim = make_backbone(cfg["backbone"], cfg["image_size"], cfg["width"])
    kept = blocks[:head_layer]
    torch.manual_seed(cfg["seed"] + 1)
    fc = nn.Linear(head_width(kept, feature_dim), classes)
    return Classifier(method.backbone, nn.Sequential(*[m for b in kept for m in b]), fc)


def dataset_labels(ds) -> torch.Tensor:
    """Labels of a :func:`sslkernels.train.make_data` split, without decoding images."""
    if hasattr(ds, "labels"):
        return torch.as_tensor(ds.labels)
    if isinstance(ds, torch.utils.data.Subset) and hasattr(ds.dataset, "folder"):
        targets = ds.dataset.folder.targets
        return torch.tensor([targets[i] for i in ds.indices])
    return torch.tensor([ds[i][1] for i in range(len(ds))])


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> list[int]:
    """Indices of ``round(fraction * n)`` samples (at least one per class), as equal a number per
    class as the classes' sizes allow, drawn by a generator seeded with ``seed``."""
    n, classes = len(labels), int(labels.max()) + 1
    want = max(classes, round(fraction * n))
    g = torch.Generator().manual_seed(seed)
    pools = [torch.nonzero(labels == c).flatten() for c in range(classes)]
    pools = [p[torch.randperm(len(p), generator=g)].tolist() for p in pools]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < want:  # round-robin over classes: equal counts where sizes allow
        added = False
        for p in pools:
            if depth < len(p) and len(chosen) < want:
                chosen.append(p[depth])
                added = True
        if not added:
            break
        depth += 1
    return sorted(chosen)


def crop_flip(size: int, min_scale: float) -> A.ViewConfig:
    """The fine-tuning and distillation augmentation: random resized crop and flip only."""
    return A.ViewConfig(size=size, scale=(min_scale, 1.0), jitter_p=0.0, gray_p=0.0,
                        blur_p=0.0, solarize_p=0.0, flip_p=0.5, mean=MEAN, std=STD,
                        channels_last=True)


def fit(model: nn.Module, batches, loss_fn, *, steps: int, steps_per_epoch: int, lr: float,
        weight_decay: float, log: MetricsLog, quiet: bool, desc: str,
        optimizer: str = "sgd") -> list[float]:
    """SGD (momentum 0.9) or LARS with a cosine schedule over ``steps``: ``batches(step)``
    gives ``(x, extra)``, ``loss_fn(model(x), extra)`` the loss. Returns the losses."""
    from .train import make_optimizer

    opt = make_optimizer(model, optimizer, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    progress = Progress(steps, steps_per_epoch, enabled=not quiet, desc=desc)
    losses = []
    model.train()
    try:
        for step in range(steps):
            x, extra = batches(step)
            loss = loss_fn(model(x), extra)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            log.write({"step": step + 1, "loss": losses[-1], "lr": opt.param_groups[0]["lr"]})
            progress.update(step + 1, losses[-1], len(x))
    finally:
        progress.close()
    return losses


def batch_sampler(indices: list[int], batch: int, seed: int):
    """``step -> indices`` of that step's batch: epochs of seeded permutations of ``indices``,
    cut into batches of ``batch`` (the incomplete last one dropped)."""
    per_epoch = max(1, len(indices) // batch)

    def at(step: int) -> list[int]:
        epoch, i = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 7_919 + epoch)
        perm = torch.randperm(len(indices), generator=g).tolist()
        return [indices[j] for j in perm[i * batch:(i + 1) * batch]]
    return at, per_epoch


def view_batches(ds, indices: list[int], batch: int, seed: int, config: A.ViewConfig, device):
    """``step -> (views, labels)``: one crop-and-flip view of each image of the step's batch."""
    at, per_epoch = batch_sampler(indices, batch, seed)

    def batches(step: int):
        images, labels = A.uint8_collate([ds[i] for i in at(step)])
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        views = A.augment(images, config, generator=g).views
        return views.to(device), labels.to(device)
    return batches, per_epoch


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or _cli.ArgumentParser(prog="python -m sslkernels finetune")
    p.add_argument("--from", dest="source", required=True, metavar="RUN",
                   help="a 'train' run directory (or its checkpoint.pt)")
    p.add_argument("--labels", type=_cli.float_in(0, 1, lo_open=True), required=True,
                   help="labelled fraction of the training set (class-balanced): 0.01, 0.1")
    p.add_argument("--head-layer", type=_cli.int_at_least(0), default=1,
                   help="projection-head layers kept below the classifier (0: encoder output; "
                        "1: SimCLR v2's choice)")
    p.add_argument("--random-init", action="store_true",
                   help="supervised baseline: the same architecture from its random "
                        "initialization")
    p.add_argument("--steps", type=_cli.int_at_least(1), default=300)
    p.add_argument("--batch-size", type=_cli.int_at_least(2), default=64,
                   help="capped at the number of labelled images")
    p.add_argument("--optimizer", choices=("sgd", "lars"), default="sgd")
    p.add_argument("--lr", type=_cli.float_in(0, lo_open=True), default=0.2)
    p.add_argument("--weight-decay", type=_cli.float_in(0), default=5e-4)
    p.add_argument("--min-scale", type=_cli.float_in(0, 1, lo_open=True), default=0.5,
                   help="smallest crop area fraction")
    p.add_argument("--label-seed", type=_cli.seed, default=0,
                   help="seed of the labelled subset and of the fine-tuning draws")
    p.add_argument("--out", default=None,
                   help="default: RUN/finetune_<pct>_layer<k> (RUN/supervised_<pct>_layer<k> "
                        "with --random-init)")
    p.add_argument("--device", type=_cli.device, default=_cli.default_device())
    p.add_argument("--quiet", action="store_true")
    return p


def run_dir(source: str, name: str) -> tuple[str, str]:
    """``(directory, checkpoint path)`` of ``--from``/``--teacher`` ``source``."""
    if os.path.isdir(source):
        return source, os.path.join(source, name)
    return os.path.dirname(source) or ".", source


def pct(fraction: float) -> str:
    return f"{100 * fraction:g}pct"


def finetune(args) -> dict:
    """Runs ``python -m sslkernels finetune``; :class:`UsageError` (nothing written) for bad
    options or an unusable run."""
    from .train import make_data

    run, ckpt = run_dir(args.source, "checkpoint.pt")
    state = load_checkpoint(ckpt, "train", "point --from at a finished 'train' run",
                            map_location="cpu")
    cfg = state["config"]
    name = ("supervised" if args.random_init else "finetune") + \
        f"_{pct(args.labels)}_layer{args.head_layer}"
    out = args.out or os.path.join(run, name)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    data = make_data(cfg)
    labels = dataset_labels(data.train)
    labelled = balanced_subset(labels, args.labels, args.label_seed)
    device = torch.device(args.device)
    model = pretrained_classifier(state, args.head_layer, len(data.classes),
                                  pretrained=not args.random_init).to(
        device, memory_format=torch.channels_last)
    batch = min(args.batch_size, len(labelled))
    if batch < 2:
        raise UsageError(f"--labels {args.labels}: {len(labelled)} labelled image(s); "
                         f"fine-tuning needs 2 (BatchNorm)")

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    result = {"from": os.path.abspath(run), "method": cfg["method"],
              "pretrain_steps": state["step"], "labels": args.labels,
              "labelled_images": len(labelled), "head_layer": args.head_layer,
              "random_init": args.random_init, "steps": args.steps, "batch_size": batch}
    if not args.random_init:
        # the frozen encoder's probe on the same labelled images, before fine-tuning moves it
        result["linear_probe"] = probe(model.backbone, data.train, data.held_out,
                                       len(data.classes), cfg["image_size"], device,
                                       train_indices=labelled)["linear"]
    batches, per_epoch = view_batches(data.train, labelled, batch, args.label_seed,
                                      crop_flip(cfg["image_size"], args.min_scale), device)
    log = MetricsLog(os.path.join(out, "metrics.jsonl"))
    try:
        losses = fit(model, batches, lambda logits, y: F.cross_entropy(logits, y),
                     steps=args.steps, steps_per_epoch=per_epoch,
                     lr=args.lr, weight_decay=args.weight_decay, log=log,
                     optimizer=args.optimizer,
                     quiet=args.quiet, desc=name)
    finally:
        log.close()
    result["final_loss"] = losses[-1]
    result["accuracy"] = accuracy(model, data.held_out, cfg["image_size"], device)
    result["seconds"] = time.perf_counter() - t0
    save_checkpoint(os.path.join(out, "model.pt"), {
        "format": FORMAT, "kind": "finetune", "config": cfg, "head_layer": args.head_layer,
        "classes": len(data.classes), "model": model.state_dict(),
        "finetune": {k: v for k, v in result.items() if not isinstance(v, dict)}})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    extra = ("" if args.random_init else
             f", linear probe on the same labels {100 * result['linear_probe']:.1f}%")
    print(f"{name}: held-out accuracy {100 * result['accuracy']:.1f}% "
          f"({len(labelled)} labelled images{extra})")
    return result


def main(argv=None) -> int:
    parser = build_parser()
    return _cli.run_command(parser, finetune, parser.parse_args(argv))
