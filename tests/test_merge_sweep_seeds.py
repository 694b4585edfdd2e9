"""benchmarks/merge_sweep_seeds.py: two tables of one set of protected encoders, on sweep seeds 1
and 2, pool into the table one run on both seeds would write; anything that would pair other
files or other attackers is refused."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_efficacy import table  # noqa: E402
from merge_sweep_seeds import merge_tables  # noqa: E402

PROTOCOL = ["sweep=main_job", "sweep.lr_grid=[0.001,0.01]"]


def _scores(value: float) -> dict:
    return {domain: {"finetune_masked": value + shift, "finetune_dense": value + shift + 0.5,
                     "best": value + shift + 0.5}
            for domain, shift in (("optdigits", 0.0), ("mnistm", 0.1), ("source", 0.2))}


def _record(setup: str, seed: int | None, model: str, per_sweep: dict[str, float], knn: float) -> dict:
    return {"setup": setup, "seed": seed, "model": model, "slc": {s: _scores(v) for s, v in per_sweep.items()},
            "source_linear": knn + 0.1, "source_knn": knn}


def _protect(setup: str, seed: int, sha: str) -> dict:
    return {"setup": setup, "seed": seed, "run_dir": f"/x/{setup}-seed{seed}", "protect_wall_s": 60.0,
            "command": [], "sparsity": 0.9, "sha256": sha}


def _full() -> dict:
    """What one run on sweep seeds 1 and 2 would record: label-free (with its sparse scratch) and a
    control on protection seeds 1 2, and the unprotected encoder."""
    records = [_record("unprotected", None, "unprotected", {"1": 0.5, "2": 0.6}, 0.93)]
    for seed in (1, 2):  # in bench_efficacy.py's order: the setups, then the sparse scratch
        records += [
            _record("label_free", seed, f"label_free-seed{seed}", {"1": -0.2 * seed, "2": -0.3 * seed}, 0.75),
            _record("random_mask", seed, f"random_mask-seed{seed}", {"1": -0.1 * seed, "2": 0.05 * seed}, 0.9),
            _record("label_free", seed, f"label_free-seed{seed}-sparse_scratch", {"1": -0.4, "2": -0.45 - seed}, 0.5),
        ]
    protect = [_protect(s, p, f"{s}{p}" * 8) for s in ("label_free", "random_mask") for p in (1, 2)]
    return {"protect": protect, "records": records, "sweep": [*PROTOCOL, "sweep.seeds=[1,2]"],
            "reference_root": "/x", "reference_sha256": "ref"}


def _only(full: dict, sweep_seed: str, setups: set[str]) -> dict:
    """The part of ``full`` that a run of one sweep seed and some setups would have written."""
    part = copy.deepcopy(full)
    part["sweep"] = [*PROTOCOL, f"sweep.seeds=[{sweep_seed}]"]
    part["protect"] = [p for p in part["protect"] if p["setup"] in setups]
    part["records"] = [{**r, "slc": {sweep_seed: r["slc"][sweep_seed]}} for r in part["records"]
                       if r["setup"] in setups | {"unprotected"}]
    return part


def _tables() -> list[dict]:
    full = _full()
    # sweep seed 1 in two tables (one per setup, each with the unprotected encoder), sweep seed 2 in one
    return [_only(full, "1", {"label_free"}), _only(full, "1", {"random_mask"}),
            _only(full, "2", {"label_free", "random_mask"})]


def test_the_union_is_the_table_of_one_run_on_both_seeds():
    full = _full()
    merged = merge_tables(_tables(), ["label_free", "random_mask"])
    assert merged["records"] == full["records"]
    assert merged["protect"] == full["protect"]
    assert merged["sweep"] == full["sweep"]
    assert merged["reference_sha256"] == "ref"
    assert table(merged["records"], merged["protect"]) == table(full["records"], full["protect"])
    assert "| label_free | 2 x 2 |" in table(merged["records"], merged["protect"])


def test_a_setup_left_out_is_dropped_with_its_protections():
    merged = merge_tables(_tables(), ["label_free"])
    assert {r["setup"] for r in merged["records"]} == {"unprotected", "label_free"}
    assert {p["setup"] for p in merged["protect"]} == {"label_free"}


@pytest.mark.parametrize("spoil, message", [
    (lambda t: t[2]["protect"][0].update(sha256="other" * 8), "another protected file"),
    (lambda t: t[2].update(reference_sha256="another"), "other unprotected encoders"),
    (lambda t: t[2]["sweep"].insert(0, "sweep.epochs=30"), "other attackers"),
    (lambda t: t[1]["records"][0]["slc"]["1"]["optdigits"].update(finetune_dense=0.0), "other numbers"),
    (lambda t: t[2]["records"][1].update(source_knn=0.1), "source_knn"),
    (lambda t: t[2]["records"].pop(), r"holds sweep seeds \[1\], not all of \[1, 2\]"),
])
def test_tables_that_do_not_pair_are_refused(spoil, message):
    tables = _tables()
    spoil(tables)
    with pytest.raises(ValueError, match=message):
        merge_tables(tables, ["label_free", "random_mask"])


def test_a_setup_no_table_holds_is_refused():
    with pytest.raises(ValueError, match="magnitude"):
        merge_tables(_tables(), ["label_free", "magnitude"])


def test_the_command_writes_the_table_and_never_overwrites(tmp_path):
    paths = []
    for i, t in enumerate(_tables()):
        paths.append(tmp_path / f"t{i}.json")
        paths[-1].write_text(json.dumps(t))
    command = [sys.executable, str(REPO / "benchmarks" / "merge_sweep_seeds.py"), *map(str, paths),
               "--setups", "label_free", "random_mask", "--root", str(tmp_path), "--table", "both"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "both.json").read_text())
    assert written["sweep"][-1] == "sweep.seeds=[1,2]"
    assert written["merged_from_sweep_seeds"] == [[1], [1], [2]]
    assert (tmp_path / "both.md").read_text() == done.stdout
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert again.returncode != 0 and "exists" in again.stderr
    assert json.loads((tmp_path / "both.json").read_text()) == written
