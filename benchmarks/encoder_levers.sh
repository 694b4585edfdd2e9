#!/usr/bin/env bash
# Issue 12, item 10: does a stronger default encoder make transfer worth more? Unprotected
# encoders only, the main job's attacker (dense fine-tune and converged linear probe).
#   1. choose on the validation split (data.split=validation), sweep seed 0, pretraining seed 0:
#      the built-in augmentation against three augmentation levers, longer pretraining and a CNN
#      twice as wide (its scratch baseline is the wide CNN too, trained once);
#   2. report the choice on the test split, sweep seeds 1 2, pretraining seeds 0 and 1.
# About 60 min on 2 cores. Results: docs/RESULTS.md, "Stronger default encoders: the levers".
#   bash benchmarks/encoder_levers.sh [OUT]     (OUT default: benchmarks/results/encoder_aug)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/encoder_aug}
R=$OUT/runs
mkdir -p "$OUT"
# shellcheck source=benchmarks/encoder_sweep_lib.sh
. benchmarks/encoder_sweep_lib.sh
# Measured when the default batch was 256: every encoder here pins it, so the script still
# measures what docs/RESULTS.md reports ("default" is the old default encoder, the same weights
# the cache held then: same seed, same config).
B=$OLD_DEFAULT_BATCH
pretrain default $B
DEFAULT=$R/pretrain/default/encoder.safetensors

evaluate val_default "$DEFAULT" default data.split=validation "sweep.seeds=[0]"
for spec in "invert05 method.invert_prob=0.5" "scale008 method.min_scale=0.08" "scale05 method.min_scale=0.5" \
            "epochs30 optim.epochs=30" "epochs30_invert05 optim.epochs=30 method.invert_prob=0.5" \
            "wide encoder.backbone=small_cnn_wide"; do
  read -r name overrides <<< "$spec"
  # shellcheck disable=SC2086
  pretrain "$name" $B $overrides
  evaluate "val_$name" "$R/pretrain/$name/encoder.safetensors" "$name" data.split=validation "sweep.seeds=[0]"
done
evaluate test_pseed0 "$DEFAULT,$R/pretrain/epochs30/encoder.safetensors" default,epochs30 "sweep.seeds=[1,2]"
pretrain default_pseed1 seed=1 $B
pretrain epochs30_pseed1 seed=1 $B optim.epochs=30
evaluate test_pseed1 "$R/pretrain/default_pseed1/encoder.safetensors,$R/pretrain/epochs30_pseed1/encoder.safetensors" \
  default_pseed1,epochs30_pseed1 "sweep.seeds=[1,2]"
