"""Result tables (write, read, summarise, print) and learning-curve plots."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ntp_ssl.errors import ConfigError, DataError
from ntp_ssl.evaluate.plots import plot_slc_curves, slc_figure
from ntp_ssl.evaluate.results import (
    RESULT_COLUMNS,
    read_results,
    summarize,
    summary_markdown,
    summary_text,
    write_results,
)

LN2 = math.log(2.0)
GRID = (0.1, 0.2, 0.8)  # ln gaps: ln 2 and ln 4 = 2 ln 2; ln(r_max / r_min) = ln 8 = 3 ln 2
T_975_DF1 = 12.706204736174696  # two-sided 95% t critical value with one degree of freedom


def _curve(model, attack, seed, accuracies, domain="d", n_total=1000):
    return [
        {"model": model, "domain": domain, "attack": attack, "seed": seed, "fraction": r,
         "n": max(round(r * n_total), 10), "accuracy": a}
        for r, a in zip(GRID, accuracies)
    ]


def hand_rows():
    """2 seeds x 3 fractions: model "m" with attacks "ft" and "lin", and the scratch curve."""
    return (
        # seed 0: AUC(ft) = ln2 (0.3+0.5)/2 + 2ln2 (0.5+0.9)/2 = 1.8 ln2; AUC(scratch) = 0.55 ln2 + 1.3 ln2 = 1.85 ln2
        _curve("m", "ft", 0, [0.3, 0.5, 0.9])
        + _curve("scratch", "scratch", 0, [0.5, 0.6, 0.7])
        # seed 1: AUC(ft) = 0.3 ln2 + 1.2 ln2 = 1.5 ln2; AUC(scratch) = 0.5 ln2 + 1.4 ln2 = 1.9 ln2
        + _curve("m", "ft", 1, [0.2, 0.4, 0.8])
        + _curve("scratch", "scratch", 1, [0.4, 0.6, 0.8])
        # "lin" equals scratch on both seeds: SLC-AUC exactly 0
        + _curve("m", "lin", 0, [0.5, 0.6, 0.7])
        + _curve("m", "lin", 1, [0.4, 0.6, 0.8])
    )


# --------------------------------------------------------------------------- write / read


def _rows_with_extras():
    rows = hand_rows()
    rows[0] = dict(rows[0], epochs=np.int64(3), note="first", lr=np.float32(0.5), tag=None, masked=True)
    rows[1] = dict(rows[1], accuracy=0.1 + 0.2, fraction=np.float64(1 / 3), seed=np.int32(0))
    return rows


def test_write_results_writes_both_files_in_column_order(tmp_path):
    csv_path, json_path = write_results(_rows_with_extras(), tmp_path / "out")
    assert csv_path == tmp_path / "out" / "results.csv" and json_path == tmp_path / "out" / "results.json"
    header = csv_path.read_text().splitlines()[0].split(",")
    assert tuple(header[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert header[len(RESULT_COLUMNS):] == ["epochs", "lr", "masked", "note", "tag"]
    data = json.loads(json_path.read_text())
    assert data["columns"] == header and len(data["rows"]) == len(hand_rows())
    stems = write_results(hand_rows(), tmp_path / "out", stem="slc")
    assert [p.name for p in stems] == ["slc.csv", "slc.json"]


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_results_round_trip_exactly(tmp_path, suffix):
    rows = _rows_with_extras()
    write_results(rows, tmp_path)
    back = read_results(tmp_path / f"results.{suffix}")
    assert len(back) == len(rows)
    for original, read in zip(rows, back):
        for column in RESULT_COLUMNS:
            assert read[column] == original[column]  # floats exactly, not approximately
            assert type(read[column]) is {"seed": int, "n": int, "fraction": float, "accuracy": float}.get(column, str)
        assert tuple(read)[: len(RESULT_COLUMNS)] == RESULT_COLUMNS
    assert back[1]["accuracy"] == 0.1 + 0.2 and back[1]["fraction"] == 1 / 3
    assert back[0]["epochs"] == 3 and back[0]["note"] == "first" and back[0]["lr"] == 0.5
    assert back[0]["tag"] is None and back[0]["masked"] is True
    # a second write of what was read gives the same files
    write_results(back, tmp_path / "again")
    assert (tmp_path / "again" / "results.csv").read_text() == (tmp_path / "results.csv").read_text()


def test_write_results_bad_value_leaves_previous_files(tmp_path):
    write_results(hand_rows(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    rows = hand_rows()
    rows[5] = dict(rows[5], extra=object())  # cannot be written: fails after row 0..4 were formatted
    with pytest.raises(ConfigError, match="cannot be written"):
        write_results(rows, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_write_results_crash_during_write_leaves_previous_file(tmp_path, monkeypatch):
    write_results(hand_rows(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def write_half_then_fail(self, data):  # a disk that fills up halfway through
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    with pytest.raises(OSError):
        write_results(hand_rows()[:3], tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no partial file, no temp file


def test_write_results_rejects_bad_rows(tmp_path):
    with pytest.raises(ConfigError, match=r"lacks \['accuracy'\]"):
        write_results([{k: 1 for k in RESULT_COLUMNS if k != "accuracy"}], tmp_path)
    with pytest.raises(ConfigError, match="seed=1.5"):
        write_results([dict(hand_rows()[0], seed=1.5)], tmp_path)
    with pytest.raises(ConfigError, match="model=''"):
        write_results([dict(hand_rows()[0], model="")], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_read_results_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither .csv nor .json"):
        read_results(tmp_path / "results.txt")
    with pytest.raises(DataError, match="cannot read"):
        read_results(tmp_path / "missing.csv")
    (tmp_path / "bad.json").write_text('{"rows": [{"model": "m"}]}')
    with pytest.raises(DataError, match="not a results table"):
        read_results(tmp_path / "bad.json")


# --------------------------------------------------------------------------- summary


def test_summarize_hand_built_rows():
    summary = summarize(hand_rows(), source_accuracy={"m": {"ft": 0.97}})
    assert [(s["model"], s["domain"], s["attack"]) for s in summary] == [("m", "d", "ft"), ("m", "d", "lin")]
    ft, lin = summary

    # per seed: seed 0: 1.8 ln2 - 1.85 ln2 = -0.05 ln2; seed 1: 1.5 ln2 - 1.9 ln2 = -0.4 ln2
    # mean -0.225 ln2; s = 0.35 ln2 / sqrt 2; half-width = t_{.975,1} * s / sqrt 2 = t * 0.175 ln2
    half = T_975_DF1 * 0.175 * LN2
    assert ft["n_seeds"] == 2
    assert ft["slc_auc"] == pytest.approx(-0.225 * LN2, abs=1e-12)
    assert ft["slc_auc_ci_low"] == pytest.approx(-0.225 * LN2 - half, abs=1e-9)
    assert ft["slc_auc_ci_high"] == pytest.approx(-0.225 * LN2 + half, abs=1e-9)
    # normalised: everything divided by ln 8 = 3 ln2
    assert ft["slc_auc_norm"] == pytest.approx(-0.075, abs=1e-12)
    assert ft["slc_auc_norm_ci_low"] == pytest.approx(-0.075 - T_975_DF1 * 0.175 / 3, abs=1e-9)
    assert ft["slc_auc_norm_ci_high"] == pytest.approx(-0.075 + T_975_DF1 * 0.175 / 3, abs=1e-9)
    assert ft["max_fraction"] == 0.8
    assert ft["accuracy_at_max_fraction"] == pytest.approx((0.9 + 0.8) / 2, abs=1e-12)
    assert ft["scratch_accuracy_at_max_fraction"] == pytest.approx((0.7 + 0.8) / 2, abs=1e-12)
    assert ft["source_accuracy"] == 0.97

    assert lin["slc_auc"] == 0.0 and lin["slc_auc_ci_low"] == 0.0 and lin["slc_auc_ci_high"] == 0.0
    assert lin["slc_auc_norm"] == 0.0
    assert lin["source_accuracy"] is None  # not given for this attack

    flat = summarize(hand_rows(), source_accuracy={"m": 0.95})
    assert [s["source_accuracy"] for s in flat] == [0.95, 0.95]
    assert summarize(list(reversed(hand_rows()))) == summarize(hand_rows())  # order of rows does not matter


def test_summarize_uses_scratch_attack_rows_only_and_custom_name():
    rows = hand_rows() + _curve("scratch", "ft", 0, [0.0, 0.0, 0.0])  # ignored: not the scratch baseline
    assert summarize(rows) == summarize(hand_rows())
    renamed = [dict(r, model="fresh") if r["model"] == "scratch" else r for r in hand_rows()]
    assert summarize(renamed, scratch_model="fresh") == summarize(hand_rows())


def test_summarize_scratch_with_extra_fractions_is_fine_missing_ones_are_not():
    rows = hand_rows()
    extra = dict(rows[3], fraction=1.0, n=1000, accuracy=0.99)  # scratch seed 0 at r = 1.0: unused
    assert summarize(rows + [extra]) == summarize(rows)
    without_scratch_point = [
        r for r in rows if not (r["model"] == "scratch" and r["seed"] == 1 and r["fraction"] == 0.2)
    ]
    with pytest.raises(ConfigError, match=r"lacks fractions \[0.2\]"):
        summarize(without_scratch_point)
    with pytest.raises(ConfigError, match="no scratch rows"):
        summarize([r for r in rows if not (r["model"] == "scratch" and r["seed"] == 1)])
    with pytest.raises(ConfigError, match="repeat"):
        summarize(rows + [rows[0]])


def test_summary_tables_contain_the_rows():
    summary = summarize(hand_rows(), source_accuracy={"m": {"ft": 0.97}})
    markdown = summary_markdown(summary)
    lines = markdown.strip().splitlines()
    assert len(lines) == 2 + len(summary)
    assert lines[0].startswith("| model | domain | attack |") and set(lines[1]) <= set("|:-")
    assert "| m | d | ft | 2 | -0.156 [" in markdown  # -0.225 ln2 = -0.1560
    assert "| m | d | lin | 2 | 0.000 [0.000, 0.000] |" in markdown
    assert "0.970" in markdown
    assert all(line.count("|") == lines[0].count("|") for line in lines)

    text = summary_text(summary)
    text_lines = text.strip().splitlines()
    assert len(text_lines) == 2 + len(summary)
    assert text_lines[2].split()[:4] == ["m", "d", "ft", "2"]
    assert "-0.156" in text_lines[2] and "0.970" in text_lines[2]
    assert len({len(line) for line in text_lines[1:]}) == 1  # right-aligned numbers: equal widths
    assert summary_markdown([]).count("\n") == 2


def test_one_seed_gives_no_interval():
    """A 95% interval needs a spread: one seed's line says the mean alone, not [v, v]."""
    one_seed = [r for r in hand_rows() if r["seed"] == 0]
    summary = summarize(one_seed)
    ft = next(s for s in summary if s["attack"] == "ft")
    assert ft["n_seeds"] == 1 and ft["slc_auc"] == pytest.approx(-0.05 * LN2, abs=1e-12)
    assert (ft["slc_auc_ci_low"], ft["slc_auc_ci_high"]) == (None, None)
    assert (ft["slc_auc_norm_ci_low"], ft["slc_auc_norm_ci_high"]) == (None, None)
    markdown = summary_markdown(summary)
    assert "| m | d | ft | 1 | -0.035 | -0.017 |" in markdown  # -0.05 ln2; / ln 8
    assert "[" not in markdown.split("\n", 2)[2]  # no interval cell in any row
    text_lines = summary_text(summary).strip().splitlines()
    assert len({len(line) for line in text_lines[1:]}) == 1


# --------------------------------------------------------------------------- plots


def test_plot_slc_curves_writes_png(tmp_path):
    rows = hand_rows() + _curve("m", "ft", 0, [0.2, 0.3, 0.5], domain="e") + _curve(
        "scratch", "scratch", 0, [0.3, 0.4, 0.6], domain="e"
    )
    path = plot_slc_curves(rows, tmp_path / "plots" / "slc.png", title="hand rows")
    assert path == tmp_path / "plots" / "slc.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["slc.png"]  # no temp file left behind


def test_slc_figure_panels_and_legend():
    rows = (hand_rows() + _curve("u", "ft", 0, [0.6, 0.7, 0.9])
            + _curve("scratch", "scratch", 0, [0.1, 0.2, 0.3], domain="e"))
    fig = slc_figure(rows, title="t")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    # domains d, e x attacks ft, lin: d|ft and d|lin; e has scratch rows only, so one panel
    assert len(fig.axes) == 4 and len(visible) == 3
    titles = sorted(ax.get_title() for ax in visible)
    assert titles == ["target d | ft", "target d | lin", "target e | from scratch"]
    d_ft = next(ax for ax in visible if ax.get_title() == "target d | ft")
    assert d_ft.get_xscale() == "log"
    assert sorted(line.get_label() for line in d_ft.get_lines()) == ["from scratch", "m", "u"]
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["m", "u", "from scratch"]
    # the line of m on d|ft is the mean over seeds at each n
    m_line = next(line for line in d_ft.get_lines() if line.get_label() == "m")
    assert np.allclose(m_line.get_ydata(), [0.25, 0.45, 0.85])
    assert np.allclose(m_line.get_xdata(), [100, 200, 800])


def test_plot_errors(tmp_path):
    with pytest.raises(ConfigError, match=".png"):
        plot_slc_curves(hand_rows(), tmp_path / "slc.pdf")
    with pytest.raises(ConfigError, match="no result rows"):
        slc_figure([])


def test_verdicts_take_the_best_attack_on_the_source_and_against_the_targets():
    from ntp_ssl.evaluate.results import verdict_text, verdicts

    def line(model, domain, attack, auc):
        return {"model": model, "domain": domain, "attack": attack, "slc_auc": auc}

    summary = [line("protected", "mnist", "finetune_masked", -0.5), line("protected", "mnist", "linear", -0.1),
               line("protected", "t1", "finetune_masked", -1.0), line("protected", "t1", "linear", -0.4),
               line("protected", "t2", "finetune_masked", 0.2), line("protected", "t2", "linear", -0.6),
               line("unprotected", "mnist", "finetune_masked", 0.1), line("unprotected", "t1", "linear", 0.3)]
    kept = {"protected": {"linear": 0.90, "knn": 0.80}, "unprotected": {"linear": 0.95, "knn": 0.90}}
    result = verdicts(summary, source_accuracy=kept, source="mnist")
    assert [v["model"] for v in result] == ["unprotected", "protected"]  # the reference first
    protected = result[1]
    assert protected["source"] == {"linear": 0.90, "knn": 0.80, "slc_auc": -0.1}  # the licensed user's best
    assert protected["source_minus_reference"] == pytest.approx({"linear": -0.05, "knn": -0.10, "slc_auc": -0.2})
    assert protected["target_slc_auc"]["finetune_masked"] == pytest.approx(-0.4)  # mean over t1, t2
    assert protected["target_slc_auc"]["best"] == pytest.approx((-0.4 + 0.2) / 2)  # best attack per target
    assert result[0]["source_minus_reference"] is None
    # selectivity: the source's SLC-AUC under each attack minus the targets' mean under it;
    # only attacks swept on both sides (the unprotected model's linear probe has no source row)
    assert protected["selectivity"] == pytest.approx({"finetune_masked": -0.5 - (-0.4), "linear": -0.1 - (-0.5),
                                                      "best": -0.1 - (-0.1)})
    assert result[0]["selectivity"] == pytest.approx({"best": 0.1 - 0.3})
    text = verdict_text(result)
    assert text.splitlines()[1].startswith("protected: source linear 0.900 (-0.050 vs unprotected)")
    assert text.splitlines()[1].endswith("selectivity (source minus targets) finetune_masked -0.100, linear +0.400, "
                                         "best +0.000")
    # a run without the reference model: its verdicts carry no differences, not dashes "vs unprotected"
    alone = verdicts([row for row in summary if row["model"] == "protected"], source_accuracy=kept, source="mnist")
    assert alone[0]["source_minus_reference"] is None
    assert verdict_text(alone).startswith("protected: source linear 0.900, kNN 0.800, best SLC-AUC -0.100; target")
    assert "vs unprotected" not in verdict_text(alone)
    # source measures the run did not make are left out, not printed as dashes
    no_curve = verdicts([row for row in summary if row["domain"] != "mnist"], source_accuracy=kept, source=None)
    assert verdict_text(no_curve).splitlines()[1].startswith(
        "protected: source linear 0.900 (-0.050 vs unprotected), kNN 0.800 (-0.100 vs unprotected); target")
    nothing = verdicts([row for row in summary if row["domain"] != "mnist"], source_accuracy=None, source=None)
    assert verdict_text(nothing).splitlines()[1].startswith("protected: source not measured; target SLC-AUC")
