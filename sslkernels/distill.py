"""``python -m sslkernels distill``: SimCLR v2's third stage. A student (the teacher's
architecture, or a narrower backbone) is trained on the *unlabelled* training images to match
the fine-tuned teacher's softened predictions, with the paper's distillation loss (Chen et al.
2020b, Eq. 2):

.. math:: L = -\\sum_x \\sum_y P^T(y \\mid x; \\tau) \\log P^S(y \\mid x; \\tau), \\qquad
          P(y \\mid x; \\tau) = \\operatorname{softmax}(f(x) / \\tau)

The teacher runs in eval mode on the same crop-and-flip view the student sees. The student
starts from a random initialization and never sees a label; its held-out accuracy is reported
next to the teacher's.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import _cli
from ._cli import UsageError
from .checkpoint import FORMAT, load_checkpoint, save_checkpoint
from .evaluate import accuracy
from .finetune import Classifier, crop_flip, fit, pretrained_classifier, run_dir, view_batches
from .metrics_log import MetricsLog


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``mean_x [-sum_y softmax(t/tau)_y log_softmax(s/tau)_y]``: cross-entropy of the
    student's tempered predictions against the teacher's (no gradient to the teacher)."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student and teacher logits must both be (B, classes), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return -(target * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(1).mean()


def load_teacher(path: str) -> tuple[dict, Classifier]:
    """The fine-tuned model saved by ``finetune`` at ``path`` (model.pt), rebuilt and loaded."""
    state = load_checkpoint(path, "finetune", "point --teacher at a 'finetune' output "
                            "directory (it holds model.pt)", map_location="cpu")
    model = pretrained_classifier({"config": state["config"]}, state["head_layer"],
                                  state["classes"], pretrained=False)
    model.load_state_dict(state["model"])
    return state, model


def student_classifier(cfg: dict, teacher: Classifier, width: int | None, classes: int,
                       seed: int) -> Classifier:
    """A randomly initialized student: the teacher's backbone type at ``width`` (``None``: the
    teacher's), the teacher's kept head layers (Linear-BN-ReLU at the same widths) and a
    linear classifier."""
    from .train import make_backbone

    torch.manual_seed(seed)
    backbone, feature_dim = make_backbone(cfg["backbone"], cfg["image_size"],
                                          width or cfg["width"])
    layers, d = [], feature_dim
    for h in [m.out_features for m in teacher.head if isinstance(m, nn.Linear)]:
        layers += [nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        d = h
    return Classifier(backbone, nn.Sequential(*layers), nn.Linear(d, classes))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or _cli.ArgumentParser(prog="python -m sslkernels distill")
    p.add_argument("--teacher", required=True, metavar="FINETUNED",
                   help="a 'finetune' output directory (or its model.pt)")
    p.add_argument("--student-width", type=_cli.int_multiple_of(4), default=None,
                   help="small backbone: the student's width (default: the teacher's; "
                        "smaller distils into a smaller network)")
    p.add_argument("--temperature", type=_cli.float_in(0, lo_open=True), default=1.0,
                   help="tau of the distillation loss (the paper's 1)")
    p.add_argument("--epochs", type=_cli.int_at_least(1), default=10,
                   help="passes over the unlabelled training images")
    p.add_argument("--batch-size", type=_cli.int_at_least(2), default=128)
    p.add_argument("--lr", type=_cli.float_in(0, lo_open=True), default=0.1)
    p.add_argument("--weight-decay", type=_cli.float_in(0), default=5e-4)
    p.add_argument("--min-scale", type=_cli.float_in(0, 1, lo_open=True), default=0.5)
    p.add_argument("--seed", type=_cli.seed, default=0)
    p.add_argument("--out", default=None, help="default: FINETUNED/distill (…_w<width> for a "
                                               "narrower student)")
    p.add_argument("--device", type=_cli.device, default=_cli.default_device())
    p.add_argument("--quiet", action="store_true")
    return p


def distill(args) -> dict:
    """Runs ``python -m sslkernels distill``; :class:`UsageError` (nothing written) for bad
    options or an unusable teacher."""
    from .train import make_data

    run, path = run_dir(args.teacher, "model.pt")
    state, teacher = load_teacher(path)
    cfg = state["config"]
    if args.student_width is not None and cfg["backbone"] != "small":
        raise UsageError(f"--student-width applies to the small backbone; the teacher is a "
                         f"{cfg['backbone']}")
    out = args.out or os.path.join(run, "distill" + (f"_w{args.student_width}"
                                                      if args.student_width else ""))
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    data = make_data(cfg)
    batch = min(args.batch_size, len(data.train))
    device = torch.device(args.device)
    student = student_classifier(cfg, teacher, args.student_width, state["classes"],
                                 args.seed).to(device, memory_format=torch.channels_last)
    teacher = teacher.to(device, memory_format=torch.channels_last).eval()

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    batches, per_epoch = view_batches(data.train, list(range(len(data.train))), batch,
                                      args.seed, crop_flip(cfg["image_size"], args.min_scale),
                                      device)

    def with_teacher(step):  # the labels of the loader are dropped: distillation is unlabelled
        x, _ = batches(step)
        with torch.no_grad():
            return x, teacher(x)

    log = MetricsLog(os.path.join(out, "metrics.jsonl"))
    try:
        losses = fit(student, with_teacher,
                     lambda s, t: distillation_loss(s, t, args.temperature),
                     steps=args.epochs * per_epoch, steps_per_epoch=per_epoch, lr=args.lr,
                     weight_decay=args.weight_decay, log=log, quiet=args.quiet,
                     desc="distill")
    finally:
        log.close()
    size = cfg["image_size"]
    result = {"teacher": os.path.abspath(run), "teacher_finetune": state["finetune"],
              "student_width": args.student_width or cfg["width"],
              "teacher_width": cfg["width"], "temperature": args.temperature,
              "epochs": args.epochs, "steps": len(losses), "final_loss": losses[-1],
              "accuracy": accuracy(student, data.held_out, size, device),
              "teacher_accuracy": accuracy(teacher, data.held_out, size, device),
              "seconds": time.perf_counter() - t0}
    save_checkpoint(os.path.join(out, "model.pt"), {
        "format": FORMAT, "kind": "distill", "config": cfg, "classes": state["classes"],
        "student_width": result["student_width"], "model": student.state_dict()})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"distilled student (width {result['student_width']}): held-out accuracy "
          f"{100 * result['accuracy']:.1f}% (teacher {100 * result['teacher_accuracy']:.1f}%, "
          f"labels seen by the teacher: {state['finetune']['labelled_images']})")
    return result


def main(argv=None) -> int:
    parser = build_parser()
    return _cli.run_command(parser, distill, parser.parse_args(argv))

