# Shared by encoder_levers.sh and encoder_schedule.sh (sourced, not run): the main job's
# attacker on unprotected encoders, and pretrain / evaluate steps that skip finished runs.
# Expects OUT (logs) and R (run root) to be set.
NTP=${NTP_SSL_BIN:-.venv/bin/ntp-ssl}  # overridable so tests can run the scripts on a stub
ATTACKER=(sweep=main_job "sweep.attacks=[finetune_dense,linear]" sweep.source_curve=false trainer.progress=false
          "paths.root=$R")
OLD_DEFAULT_BATCH=optim.batch_size=256  # the default pretraining batch before issue 12's encoder search

pretrain() {  # NAME OVERRIDE...
  local name=$1; shift
  [ -f "$R/pretrain/$name/encoder.safetensors" ] || \
    /usr/bin/time -f "%e s %M KiB" -o "$OUT/pretrain_$name.time" \
      $NTP pretrain "$@" "run_name=$name" "paths.root=$R" trainer.progress=false > "$OUT/pretrain_$name.log" 2>&1
}
evaluate() {  # RUN CHECKPOINTS NAMES OVERRIDE...
  local run=$1 checkpoints=$2 names=$3; shift 3
  [ -f "$R/evaluate/$run/summary.json" ] || \
    $NTP evaluate "checkpoints=[$checkpoints]" "names=[$names]" "${ATTACKER[@]}" "run_name=$run" "$@" \
      > "$OUT/evaluate_$run.log" 2>&1
  head -n 2 "$R/evaluate/$run/summary.md"
}
