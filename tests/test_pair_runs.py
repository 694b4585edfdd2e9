"""benchmarks/pair_runs.py on two hand-made runs: which rows it pairs, and its totals."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = "model,domain,attack,seed,fraction,n,accuracy,best_step,choice,steps,val_accuracy"


def _run_dir(path: Path, rows: list[str], slc: float) -> Path:
    path.mkdir()
    (path / "results.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    verdict = {"model": "m", "target_slc_auc": {"finetune_dense": slc, "best": slc},
               "source": {"slc_auc": 0.1, "knn": 0.9}}
    (path / "summary.json").write_text(json.dumps({"verdicts": [verdict]}))
    return path


def test_pairs_fine_tunes_skips_a_repeated_dense_row_and_counts_choices(tmp_path):
    a = _run_dir(tmp_path / "a", [
        "scratch,t,scratch,0,1.0,10,0.50,,0.001,50,",
        "m,t,finetune_dense,0,1.0,10,0.80,3,0.01,50,0.7",
        "m,t,finetune_masked,0,1.0,10,0.80,3,0.01,50,0.7",  # repeats dense: not a row of its own
        "m,t,knn,0,1.0,10,0.60,,,0,",
    ], slc=0.25)
    b = _run_dir(tmp_path / "b", [
        "scratch,t,scratch,0,1.0,10,0.54,,0.003,50,",
        "m,t,finetune_dense,0,1.0,10,0.78,3,0.01,50,0.7",
        "m,t,finetune_masked,0,1.0,10,0.78,3,0.01,50,0.7",
        "m,t,knn,0,1.0,10,0.60,,,0,",
    ], slc=0.5)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pair_runs.py"), str(a), str(b), "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # two paired rows: +0.04 and -0.02, mean +0.01; one of two searched points kept its rate
    assert "rows: 2; B - A mean +0.0100" in done.stdout
    assert "the same learning rate at 1 of 2 searched points" in done.stdout
    assert "frozen-attack accuracies equal at 1 of 1" in done.stdout
    assert "finetune_dense +0.250 / +0.500" in done.stdout


def test_runs_with_other_rows_are_refused(tmp_path):
    a = _run_dir(tmp_path / "a", ["scratch,t,scratch,0,1.0,10,0.50,,,50,"], slc=0.0)
    b = _run_dir(tmp_path / "b", ["scratch,u,scratch,0,1.0,10,0.50,,,50,"], slc=0.0)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pair_runs.py"), str(a), str(b)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "different rows" in done.stderr
