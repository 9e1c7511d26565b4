"""Builds the README's results tables (printed as markdown) and docs/curves.png from the runs
of the README's commands.

    python tools/readme_results.py pretrain runs/simclr runs/simclrv2 runs/mocov2 runs/byol \\
        runs/simsiam runs/simsiam_no_stop_grad --png docs/curves.png
    python tools/readme_results.py moco-ablation runs/mocov2 runs/mocov2_linear ...
    python tools/readme_results.py simclrv2 runs/simclrv2

``pretrain``: one row per ``train`` run (probe accuracies against the random-init baseline, the
final embedding std against 1/sqrt(d)) and the figure (loss curves, the collapse monitor of every
run, probe bars). ``moco-ablation``: MoCo v2 runs tabled by their switches (head, augmentation,
schedule). ``simclrv2``: the 1% / 10% table from the ``finetune`` and ``distill`` outputs under
a SimCLR v2 run (``finetune_<pct>_layer<k>``, ``supervised_<pct>_layer0``,
``finetune_<pct>_layer1/distill``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os


def _load(path: str, name: str = "results.json") -> dict:
    f = os.path.join(path, name)
    if not os.path.exists(f):
        raise SystemExit(f"{path}: no {name} (did the run finish?)")
    with open(f) as fh:
        return json.load(fh)


def _steps(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _label(res: dict) -> str:
    cfg = res["config"]
    extra = [s for s, on in (("no stop-grad", cfg.get("no_stop_grad")),
                             ("linear head", cfg.get("no_mlp"))) if on]
    if cfg.get("method") == "simclrv2":
        extra.append(f"memory {cfg['queue_size']}" if cfg.get("queue_size") else "no memory")
    return cfg["method"] + (f" ({', '.join(extra)})" if extra else "")


def pretrain(runs: list[str], png: str | None) -> None:
    rows = []
    for run in runs:
        res = _load(run)
        if "probe" not in res:
            raise SystemExit(f"{run}: results.json has no probe (run without --no-probe)")
        rows.append((run, res, _steps(run)))
    print("| method | epochs | s/epoch | linear probe: trained | random init | kNN: trained "
          "| random init | embedding std (1/√d) |")
    print("|---|---|---|---|---|---|---|---|")
    for run, res, steps in rows:
        t, r = res["probe"]["trained"], res["probe"]["random"]
        dim = res.get("embedding_dim")
        std = res.get("embedding_std")
        print(f"| {_label(res)} | {res['config']['epochs']} | {res['seconds_per_epoch']:.1f} "
              f"| **{_pct(t['linear'])}** | {_pct(r['linear'])} | **{_pct(t['knn'])}** "
              f"| {_pct(r['knn'])} | {std:.4f} ({dim ** -0.5:.4f}) |")
    if png:
        _figure(rows, png)


def _figure(rows, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, axes = plt.subplots(1, n + 2, figsize=(2.9 * (n + 2), 2.8))
    for ax, (run, res, steps) in zip(axes, rows):
        ax.plot([s["epoch"] for s in steps], [s["loss"] for s in steps], lw=0.8)
        ax.set_title(f"{_label(res)} loss", fontsize=8)
        ax.set_xlabel("epoch")
    ax = axes[n]
    for run, res, steps in rows:
        d = res.get("embedding_dim") or 1
        # relative to 1/sqrt(d), so heads of different widths share one axis
        ax.plot([s["epoch"] for s in steps], [s["embedding_std"] * d ** 0.5 for s in steps],
                lw=0.8, label=_label(res))
    ax.axhline(1.0, ls="--", lw=0.8, color="#999")
    ax.set_ylim(0, 1.3)
    ax.set_title("embedding std x sqrt(d) (collapse: 0)", fontsize=8)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=5)
    ax = axes[n + 1]
    width = 0.2
    for i, (label, who, key) in enumerate((("linear", "trained", "linear"),
                                           ("linear, random", "random", "linear"),
                                           ("kNN", "trained", "knn"),
                                           ("kNN, random", "random", "knn"))):
        ax.bar([j + (i - 1.5) * width for j in range(n)],
               [100 * r[1]["probe"][who][key] for r in rows], width, label=label)
    ax.set_xticks(range(n), [_label(r[1]).replace(" (", "\n(") for r in rows], fontsize=5)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("probe", fontsize=8)
    ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def moco_ablation(runs: list[str]) -> None:
    print("| head | augmentation | schedule | epochs | linear probe | kNN |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        res = _load(run)
        cfg = res["config"]
        if cfg["method"] != "mocov2":
            raise SystemExit(f"{run}: a {cfg['method']} run, not mocov2")
        aug = {"moco_v2": "v2 (with blur)", "moco_v1": "v1 (no blur)"}.get(cfg["recipe"],
                                                                          cfg["recipe"])
        t = res["probe"]["trained"]
        print(f"| {'linear' if cfg['no_mlp'] else 'MLP'} | {aug} | {cfg['schedule']} "
              f"| {cfg['epochs']} | **{_pct(t['linear'])}** | {_pct(t['knn'])} |")


def simclrv2(run: str) -> None:
    pre = _load(run)
    fractions = sorted({os.path.basename(p).split("_")[1]
                        for p in glob.glob(os.path.join(run, "finetune_*pct_layer*"))},
                       key=lambda s: float(s[:-3]))
    if not fractions:
        raise SystemExit(f"{run}: no finetune_<pct>_layer<k> outputs")

    def get(name, key="accuracy"):
        path = os.path.join(run, name)
        return _load(path).get(key) if os.path.exists(os.path.join(path, "results.json")) \
            else None

    print("| labels | images | supervised (random init) | linear probe | fine-tune from "
          "layer 0 | fine-tune from layer 1 | distilled student |")
    print("|---|---|---|---|---|---|---|")
    for f in fractions:
        l1 = f"finetune_{f}_layer1"
        n = get(l1, "labelled_images") or get(f"finetune_{f}_layer0", "labelled_images")
        vals = [get(f"supervised_{f}_layer0"), get(l1, "linear_probe"),
                get(f"finetune_{f}_layer0"), get(l1), get(os.path.join(l1, "distill"))]
        best = max(v for v in vals if v is not None)
        cells = [f"**{_pct(v)}**" if v == best else _pct(v) for v in vals]
        print(f"| {f[:-3]}% | {n} | " + " | ".join(cells) + " |")
    print(f"\n(pretraining: {_label(pre)}, {pre['config']['epochs']} epochs; full-label linear "
          f"probe {_pct(pre['probe']['trained']['linear'])})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="table", required=True)
    a = sub.add_parser("pretrain")
    a.add_argument("runs", nargs="+")
    a.add_argument("--png", default=None, help="write the figure here")
    sub.add_parser("moco-ablation").add_argument("runs", nargs="+")
    sub.add_parser("simclrv2").add_argument("run")
    args = p.parse_args(argv)
    if args.table == "pretrain":
        pretrain(args.runs, args.png)
    elif args.table == "moco-ablation":
        moco_ablation(args.runs)
    else:
        simclrv2(args.run)


if __name__ == "__main__":
    main()
