"""Command line: ``python -m sslkernels train --method simclr|simclrv2|mocov2|byol|simsiam``
(the main job: self-supervised pretraining and probes), ``finetune`` and ``distill`` (SimCLR
v2's second and third stages), and ``demo`` (fused NT-Xent against lightly's formulation).

Bad arguments end as one line ``python -m sslkernels <command>: error: ...`` and exit status 2,
with nothing written."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def demo(args: argparse.Namespace) -> int:
    """Backpropagates the fused NT-Xent loss through a small projection head and compares it,
    value, gradient and speed, with lightly's formulation on the same inputs."""
    from sslkernels import fused_info_nce
    from sslkernels.reference.info_nce import lightly_ntxent

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    head = torch.nn.Sequential(torch.nn.Linear(args.dim, args.dim), torch.nn.ReLU(),
                               torch.nn.Linear(args.dim, args.dim)).to(device)
    x0 = torch.randn(args.batch, args.dim, device=device)
    x1 = x0 + 0.1 * torch.randn_like(x0)

    def loss_with(fn):
        head.zero_grad()
        loss = fn(head(x0), head(x1), args.temperature)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in head.parameters()]

    fused = lambda a, b, t: fused_info_nce(a, b, temperature=t)  # noqa: E731
    loss_f, grads_f = loss_with(fused)
    loss_r, grads_r = loss_with(lightly_ntxent)
    grad_err = max((a - b).abs().max().item() for a, b in zip(grads_f, grads_r))
    t_f = _time(lambda: loss_with(fused), args.repeats)
    t_r = _time(lambda: loss_with(lightly_ntxent), args.repeats)
    print(f"NT-Xent, {args.batch} pairs x {args.dim} dims, tau={args.temperature}, "
          f"device={device}, {torch.get_num_threads()} CPU threads")
    print(f"  loss  fused {loss_f.item():.6f}   lightly formulation {loss_r.item():.6f}   "
          f"max |grad difference| {grad_err:.2e}")
    print(f"  time  fused {t_f * 1e3:8.1f} ms   lightly formulation {t_r * 1e3:8.1f} ms   "
          f"speed-up {t_r / t_f:.1f}x  (head forward+backward included)")
    ok = abs(loss_f.item() - loss_r.item()) <= 1e-4 * max(1.0, abs(loss_r.item()))
    if not ok:
        print("  MISMATCH between the fused loss and the reference", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    from . import _cli, distill, finetune, train

    parser = _cli.ArgumentParser(prog="python -m sslkernels")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "train": (train, "self-supervised pretraining + linear and kNN probes"),
        "finetune": (finetune, "fine-tune a pretrained run on a labelled fraction (SimCLR v2)"),
        "distill": (distill, "distil a fine-tuned model into a student on unlabelled images "
                             "(SimCLR v2)"),
    }
    parsers = {name: mod.build_parser(sub.add_parser(name, help=text))
               for name, (mod, text) in commands.items()}
    p = sub.add_parser("demo", help="fused NT-Xent vs lightly's formulation: value, grad, speed")
    p.add_argument("--batch", type=int, default=2048, help="pairs per step (N per view)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in commands:
        mod = commands[args.command][0]
        return _cli.run_command(parsers[args.command], getattr(mod, args.command), args)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
