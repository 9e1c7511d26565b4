"""Collects `python -m sslkernels train` runs into the README's results table (printed as
markdown) and one small figure: loss curves of every method and their probe accuracies against
the random-init baseline.

    python tools/readme_results.py runs/simclr runs/mocov2 runs/byol runs/simsiam --png docs/curves.png
"""
from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (with results.json, metrics.jsonl)")
    p.add_argument("--png", default=None, help="write the figure here")
    args = p.parse_args(argv)
    rows, curves = [], []
    for run in args.runs:
        for name in ("results.json", "metrics.jsonl"):
            if not os.path.exists(os.path.join(run, name)):
                raise FileNotFoundError(f"{run}: no {name} (did the run finish with its probe?)")
        with open(os.path.join(run, "results.json")) as f:
            res = json.load(f)
        if "probe" not in res:
            raise ValueError(f"{run}: results.json has no probe (run without --no-probe)")
        with open(os.path.join(run, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f]
        epochs = steps[-1]["epoch"]
        rows.append((res["method"], epochs, res["seconds_per_epoch"], res["probe"]))
        curves.append((res["method"], [s["epoch"] for s in steps], [s["loss"] for s in steps]))
    print("| method | epochs | s/epoch | linear probe: trained | random init | kNN: trained "
          "| random init |")
    print("|---|---|---|---|---|---|---|")
    for method, epochs, spe, pr in rows:
        t, r = pr["trained"], pr["random"]
        print(f"| {method} | {epochs:.0f} | {spe:.1f} | **{100 * t['linear']:.1f}%** | "
              f"{100 * r['linear']:.1f}% | **{100 * t['knn']:.1f}%** | {100 * r['knn']:.1f}% |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(curves) + 1, figsize=(3.2 * (len(curves) + 1), 2.8))
        for ax, (method, x, y) in zip(axes, curves):
            ax.plot(x, y, lw=0.8)
            ax.set_title(f"{method} loss")
            ax.set_xlabel("epoch")
        ax = axes[-1]
        width = 0.2
        for i, (label, who, key) in enumerate((("linear", "trained", "linear"),
                                               ("linear, random", "random", "linear"),
                                               ("kNN", "trained", "knn"),
                                               ("kNN, random", "random", "knn"))):
            ax.bar([j + (i - 1.5) * width for j in range(len(rows))],
                   [100 * r[3][who][key] for r in rows], width, label=label)
        ax.set_xticks(range(len(rows)), [r[0] for r in rows])
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title("probe")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(args.png, dpi=80)
        plt.close(fig)


if __name__ == "__main__":
    main()
