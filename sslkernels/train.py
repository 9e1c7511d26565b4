"""The trainer behind ``python -m sslkernels train``: one method, one dataset, checkpoints that
resume to the same losses, and a linear probe against the randomly initialized encoder.

Every random draw after model initialization is a function of (seed, step) or (seed, epoch): the
epoch's shuffle and each step's augmentations. A checkpoint therefore only has to hold the
module, optimizer and scheduler states (EMA targets and the queue are module buffers) and the
step, and a resumed run reproduces the uninterrupted one exactly.

Under ``torchrun --nproc_per_node=W`` each process trains on its slice of every global batch of
``--batch-size`` images (:class:`sslkernels.distributed.Ranks`); rank 0 alone logs, checkpoints
and probes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import augment as A
from . import methods as M
from .data import ImageFolderUint8, SyntheticShapes
from .distributed import Ranks

METHODS = ("simclr", "mocov2", "byol", "simsiam")

# Augmentation recipes from the official code (sslkernels.augment: SimCLR's data_util.py,
# MoCo v2's --aug-plus, which SimSiam reuses, and BYOL's asymmetric views).
RECIPES = {"simclr": A.simclr, "mocov2": A.moco_v2, "byol": A.byol, "simsiam": A.simsiam}
DEFAULT_EPOCHS = {"simclr": 15, "mocov2": 15, "byol": 60, "simsiam": 30}
# BYOL is trained with LARS in the paper, and on the default dataset it learns more with it (32%
# vs 28% linear); the others use SGD as their official code does.
DEFAULT_OPTIMIZER = {"simclr": "sgd", "mocov2": "sgd", "byol": "lars", "simsiam": "sgd"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m sslkernels train")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--data", default=None,
                   help="image folder (ImageFolder layout); default: the embedded synthetic "
                        "shapes dataset (no download)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--backbone", default="small", choices=("small", "resnet18", "resnet50"),
                   help="small: a 4-block convnet; resnet*: torchvision ResNet (small-image stem "
                        "below 96 px)")
    p.add_argument("--width", type=int, default=64,
                   help="small backbone: channels of its last two blocks")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())
                        + " (without negatives BYOL and SimSiam learn more slowly)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=("sgd", "lars"), default=None,
                   help="default: lars for byol, sgd for the others")
    p.add_argument("--lr", type=float, default=None,
                   help="base learning rate per 256 images (default: 0.5 SimCLR, MoCo v2 and "
                        "BYOL, 1.0 SimCLR and BYOL with LARS; 0.2 SimSiam)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=4000, help="synthetic dataset: images")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", default="runs/{method}", help="output directory")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps in total")
    p.add_argument("--queue-size", type=int, default=2048, help="MoCo queue K")
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--min-scale", type=float, default=None,
                   help="smallest crop area fraction (default: 0.4 for images below 64 px, "
                        "else the recipe's 0.08 or 0.2)")
    p.add_argument("--per-image-augment", action="store_true",
                   help="torchvision v2 image by image instead of the batched augmentation")
    p.add_argument("--quiet", action="store_true")
    return p


# ---------------------------------------------------------------------------------------------
# Pieces

def make_backbone(name: str, image_size: int, width: int = 64) -> tuple[nn.Module, int]:
    if name == "small":
        net = M.SmallConvNet(width)
        return net, net.width
    return M.resnet_backbone(name, small_images=image_size < 96)


def make_method(name: str, backbone: nn.Module, width: int, args) -> nn.Module:
    # Sized for runs of a few hundred steps: SimCLR at the paper's CIFAR temperature (0.5; 0.1-0.2
    # needs large batches), MoCo's and BYOL's targets with lower momentum than the papers'
    # 0.999 / 0.996, which are tuned for hundreds of ImageNet epochs and would leave the target
    # almost at its random initialization here.
    if name == "simclr":
        return M.SimCLR(backbone, width, proj_hidden=512, proj_dim=128, proj_layers=3,
                        temperature=0.5)
    if name == "mocov2":
        return M.MoCoV2(backbone, width, dim=128, mlp_hidden=512, queue_size=args.queue_size,
                        momentum=0.99, temperature=0.2)
    if name == "byol":
        return M.BYOL(backbone, width, proj_hidden=1024, proj_dim=256, pred_hidden=1024,
                      base_momentum=0.99)
    return M.SimSiam(backbone, width, dim=512, pred_dim=128)


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


def make_optimizer(method: nn.Module, name: str, opt_name: str, lr: float, wd: float):
    if isinstance(method, M.SimSiam):
        groups = method.parameter_groups()
    else:
        groups = [{"params": [p for p in method.parameters() if p.requires_grad],
                   "fix_lr": False}]
    if opt_name == "lars":
        return LARS(groups, lr=lr, weight_decay=wd)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
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

    ``min_scale`` replaces the lower end of the recipe's crop-area range (both views).
    """

    def __init__(self, method: str, size: int, seed: int, per_image: bool = False,
                 min_scale: float | None = None, channels_last: bool = False):
        if method not in RECIPES:
            raise ValueError(f"method must be one of {tuple(RECIPES)}, got {method!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        configs = RECIPES[method](size, mean=MEAN, std=STD, channels_last=channels_last)
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


def make_data(args) -> Data:
    if args.data is None:
        train = _materialize(SyntheticShapes(args.train_size, args.image_size, seed=args.seed))
        held = _materialize(SyntheticShapes(max(500, args.train_size // 4), args.image_size,
                                            seed=args.seed + 7919))
        return Data(train, held, train.classes)
    full = ImageFolderUint8(args.data)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(full), generator=g).tolist()
    cut = max(1, len(full) // 5)
    held = torch.utils.data.Subset(full, perm[:cut])
    train = torch.utils.data.Subset(full, perm[cut:])
    return Data(train, held, full.classes)


def _batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: written to a temporary file in the same directory, then renamed over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Probe

@torch.no_grad()
def _features(backbone: nn.Module, ds, size: int, device, batch: int = 256):
    from torchvision.transforms import v2

    prep = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    was = backbone.training
    backbone.eval()
    feats, labels = [], []
    for i in range(0, len(ds), batch):
        items = [ds[j] for j in range(i, min(len(ds), i + batch))]
        ims = [im for im, _ in items]
        # one call for a batch of equal-sized images: tiny per-image ops are slow on a busy CPU
        x = (prep(torch.stack(ims)) if all(im.shape == ims[0].shape for im in ims)
             else torch.stack([prep(im) for im in ims])).to(device)
        feats.append(backbone(x).float().cpu())
        labels.append(torch.tensor([l for _, l in items]))
    backbone.train(was)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train_x, train_y, test_x, test_y, classes: int, epochs: int = 100) -> float:
    """Accuracy of a softmax classifier on standardized frozen features (full-batch L-BFGS)."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    tx, vx = (train_x - mu) / sd, (test_x - mu) / sd
    torch.manual_seed(0)
    clf = nn.Linear(tx.shape[1], classes)
    opt = torch.optim.LBFGS(clf.parameters(), lr=0.5, max_iter=epochs, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(tx), train_y) + 1e-4 * clf.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (clf(vx).argmax(1) == test_y).float().mean().item()


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20) -> float:
    a, b = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    idx = (b @ a.T).topk(k, dim=1).indices
    votes = train_y[idx]
    pred = torch.mode(votes, dim=1).values
    return (pred == test_y).float().mean().item()


def probe(backbone, data: Data, size: int, device) -> dict:
    tx, ty = _features(backbone, data.train, size, device)
    vx, vy = _features(backbone, data.held_out, size, device)
    n = len(data.classes)
    return {"linear": linear_probe(tx, ty, vx, vy, n), "knn": knn_accuracy(tx, ty, vx, vy)}


def plot(path: str, losses: list[float], steps_per_epoch: int, acc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = [(i + 1) / steps_per_epoch for i in range(len(losses))]
    a.plot(x, losses, lw=1)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.set_title("loss")
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
    out = args.out.format(method=args.method)
    os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    ranks = Ranks.from_env(args.device, args.batch_size)
    device = ranks.device(args.device)
    torch.manual_seed(args.seed)
    data = make_data(args)
    if args.width < 4 or args.width % 4:
        raise ValueError(f"--width must be a positive multiple of 4, got {args.width}")
    backbone, width = make_backbone(args.backbone, args.image_size, args.width)
    # channels-last convolutions are ~1.5x faster on CPU; the augmentation op writes the views
    # in that layout directly
    method = make_method(args.method, backbone, width, args).to(
        device, memory_format=torch.channels_last)
    import copy
    random_backbone = copy.deepcopy(method.backbone)  # the baseline the probe compares with
    if args.optimizer is None:
        args.optimizer = DEFAULT_OPTIMIZER[args.method]
    base_lr = args.lr if args.lr is not None else {
        "simclr": 1.0 if args.optimizer == "lars" else 0.5, "byol": 1.0 if args.optimizer ==
        "lars" else 0.5, "simsiam": 0.2, "mocov2": 0.5}[args.method]
    lr = base_lr * args.batch_size / 256
    optimizer = make_optimizer(method, args.method, args.optimizer, lr, args.weight_decay)
    steps_per_epoch = len(data.train) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({len(data.train)} images)")
    step_fn = ranks.wrap(method)
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.method]
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    total = steps_per_epoch * args.epochs
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_epochs * steps_per_epoch), total)
    views = Views(args.method, args.image_size, args.seed, per_image=args.per_image_augment,
                  min_scale=default_min_scale(args.image_size) if args.min_scale is None
                  else args.min_scale, channels_last=True)
    step, losses = 0, []
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random_backbone.load_state_dict(state["random_backbone"])
        step, losses = state["step"], state["losses"]

    def checkpoint():
        if not ranks.main:
            return
        save_checkpoint(ckpt_path, {"method": method.state_dict(),
                                    "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(),
                                    "random_backbone": random_backbone.state_dict(),
                                    "step": step, "losses": losses, "args": vars(args)})

    metrics = open(os.path.join(out, "metrics.jsonl") if ranks.main else os.devnull, "a")
    stop_at = total if args.stop_after is None else min(total, args.stop_after)
    t_start, seen = time.perf_counter(), 0
    method.train()
    try:
        while step < stop_at:
            epoch, first = divmod(step, steps_per_epoch)
            loader = torch.utils.data.DataLoader(
                data.train, batch_sampler=[ranks.slice(b) for b in _batches(
                    len(data.train), args.batch_size, args.seed, epoch)[first:]],
                collate_fn=A.uint8_collate, num_workers=args.workers)
            for images, _ in loader:
                t0 = time.perf_counter()
                ranks.seed_step(args.seed, step)
                v = views(images, ranks.augment_key(step), device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                    loss = step_fn(v)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                method.after_optimizer_step(step, total)
                step += 1
                losses.append(ranks.mean(loss.detach()).item())
                seen += len(images) * ranks.world
                ips = len(images) * ranks.world / (time.perf_counter() - t0)
                metrics.write(json.dumps({"step": step, "epoch": step / steps_per_epoch,
                                          "loss": losses[-1],
                                          "lr": optimizer.param_groups[0]["lr"],
                                          "images_per_s": ips}) + "\n")
                if not args.quiet and ranks.main:
                    done = int(30 * step / total)
                    print(f"\r[{'#' * done}{'.' * (30 - done)}] epoch {epoch + 1}/{args.epochs} "
                          f"step {step}/{total} loss {losses[-1]:.4f} {ips:.0f} img/s",
                          end="", file=sys.stderr, flush=True)
                if step % args.checkpoint_every == 0 or step == stop_at:
                    checkpoint()
                if step >= stop_at:
                    break
    except KeyboardInterrupt:
        checkpoint()
        metrics.close()
        print(f"\ninterrupted at step {step}; checkpoint saved to {ckpt_path} "
              f"(continue with --resume)", file=sys.stderr)
        raise
    metrics.close()
    if not args.quiet and ranks.main:
        print(file=sys.stderr)
    elapsed = time.perf_counter() - t_start
    result = {"method": args.method, "steps": step, "losses": losses,
              "seconds": elapsed, "seconds_per_epoch": elapsed / max(1e-9, seen / len(data.train))}
    if step >= total and ranks.main:
        checkpoint()
        if not args.no_probe:
            acc = {"random": probe(random_backbone, data, args.image_size, device),
                   "trained": probe(method.backbone, data, args.image_size, device)}
            result["probe"] = acc
            plot(os.path.join(out, "curves.png"), losses, steps_per_epoch, acc)
            print(f"{args.method}: linear probe {100 * acc['trained']['linear']:.1f}% "
                  f"(random init {100 * acc['random']['linear']:.1f}%), kNN "
                  f"{100 * acc['trained']['knn']:.1f}% (random init "
                  f"{100 * acc['random']['knn']:.1f}%), {result['seconds_per_epoch']:.1f} s/epoch")
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({k: v for k, v in result.items() if k != "losses"}, f, indent=2)
    ranks.close()
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except KeyboardInterrupt:
        return 130
    return 0
