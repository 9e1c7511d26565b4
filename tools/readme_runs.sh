#!/usr/bin/env bash
# Every command of the README's results, in order, then the tables and docs/curves.png built
# from their outputs (tools/readme_results.py). Sequential on purpose: s/epoch is measured.
#   bash tools/readme_runs.sh            # runs/ must not hold these runs yet (or: OVERWRITE=1)
# The README's figures: OMP_NUM_THREADS=1 bash tools/readme_runs.sh on 2 shared cores (with
# other jobs on the cores, two OpenMP threads per run were 7x slower than one).
set -euo pipefail
cd "$(dirname "$0")/.."
over=${OVERWRITE:+--overwrite}
train() { python -m sslkernels train "$@" $over; }

# 1. the five methods, and SimSiam's stop-gradient ablation (collapse)
for m in simclr simclrv2 mocov2 byol simsiam; do train --method "$m"; done
train --method simclrv2 --queue-size 2048 --out runs/simclrv2_memory
train --method simsiam --no-stop-grad --out runs/simsiam_no_stop_grad

# 2. MoCo v2's ablations: head, augmentation, schedule, and all three back to MoCo v1's
train --method mocov2 --no-mlp --out runs/mocov2_linear_head
train --method mocov2 --recipe moco_v1 --out runs/mocov2_v1_augmentation
train --method mocov2 --schedule step --out runs/mocov2_step_schedule
train --method mocov2 --no-mlp --recipe moco_v1 --schedule step --out runs/mocov2_as_v1

# 3. SimCLR v2's fine-tuning (from the encoder and from the first head layer), the supervised
#    baseline, and distillation of the layer-1 model, at 1% and 10% of the labels
for labels in 0.01 0.1; do
  python -m sslkernels finetune --from runs/simclrv2 --labels $labels --head-layer 0
  python -m sslkernels finetune --from runs/simclrv2 --labels $labels --head-layer 1
  python -m sslkernels finetune --from runs/simclrv2 --labels $labels --head-layer 0 --random-init
  pct=$(python -c "print(f'{100 * $labels:g}pct')")
  python -m sslkernels distill --teacher runs/simclrv2/finetune_${pct}_layer1
done

python tools/readme_results.py pretrain runs/simclr runs/simclrv2 runs/simclrv2_memory \
  runs/mocov2 runs/byol runs/simsiam runs/simsiam_no_stop_grad --png docs/curves.png
python tools/readme_results.py moco-ablation runs/mocov2 runs/mocov2_linear_head \
  runs/mocov2_v1_augmentation runs/mocov2_step_schedule runs/mocov2_as_v1
python tools/readme_results.py simclrv2 runs/simclrv2
