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
NTP=.venv/bin/ntp-ssl
mkdir -p "$OUT"
# the main job's default encoder, found in the cache or pretrained there (pipeline.default_encoder)
DEFAULT=$(.venv/bin/python -c "
from hydra import compose, initialize_config_dir
from ntp_ssl.cli import config_dir
from ntp_ssl.config import register_schemas
from ntp_ssl.data.cache import default_cache_dir
from ntp_ssl.pipeline import default_encoder
register_schemas()
with initialize_config_dir(config_dir=str(config_dir()), version_base='1.3'):
    print(default_encoder(compose('protect'), default_cache_dir()))" | tail -n 1)
ATTACKER=(sweep=main_job "sweep.attacks=[finetune_dense,linear]" sweep.source_curve=false trainer.progress=false
          "paths.root=$R")

pretrain() {  # NAME OVERRIDE...
  local name=$1; shift
  [ -f "$R/pretrain/$name/encoder.safetensors" ] || \
    $NTP pretrain "$@" "run_name=$name" "paths.root=$R" trainer.progress=false > "$OUT/pretrain_$name.log" 2>&1
}
evaluate() {  # RUN CHECKPOINTS NAMES OVERRIDE...
  local run=$1 checkpoints=$2 names=$3; shift 3
  [ -f "$R/evaluate/$run/summary.json" ] || \
    $NTP evaluate "checkpoints=[$checkpoints]" "names=[$names]" "${ATTACKER[@]}" "run_name=$run" "$@" \
      > "$OUT/evaluate_$run.log" 2>&1
  head -n 2 "$R/evaluate/$run/summary.md"
}

evaluate val_default "$DEFAULT" default data.split=validation "sweep.seeds=[0]"
for spec in "invert05 method.invert_prob=0.5" "scale008 method.min_scale=0.08" "scale05 method.min_scale=0.5" \
            "epochs30 optim.epochs=30" "epochs30_invert05 optim.epochs=30 method.invert_prob=0.5" \
            "wide encoder.backbone=small_cnn_wide"; do
  read -r name overrides <<< "$spec"
  # shellcheck disable=SC2086
  pretrain "$name" $overrides
  evaluate "val_$name" "$R/pretrain/$name/encoder.safetensors" "$name" data.split=validation "sweep.seeds=[0]"
done
evaluate test_pseed0 "$DEFAULT,$R/pretrain/epochs30/encoder.safetensors" default,epochs30 "sweep.seeds=[1,2]"
pretrain default_pseed1 seed=1
pretrain epochs30_pseed1 seed=1 optim.epochs=30
evaluate test_pseed1 "$R/pretrain/default_pseed1/encoder.safetensors,$R/pretrain/epochs30_pseed1/encoder.safetensors" \
  default_pseed1,epochs30_pseed1 "sweep.seeds=[1,2]"
