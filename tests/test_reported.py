"""Reported numbers as data (itmkit/reported_results.csv): coverage of the nine specs, rsum
consistency, types, spot checks against the spec text itself, the comparison helper and its plot."""

import math
import re

import matplotlib
import pandas as pd
import pytest

from itmkit.data.errors import DataFormatError
from itmkit.paths import REPO_ROOT
from itmkit.reported import (
    COLUMNS,
    RECALL_COLUMNS,
    RSUM_ROUNDING,
    compare_with_reported,
    read_reported_csv,
    reported_results,
    results_file,
)

matplotlib.use("Agg")

NINE = {"vse_infty", "scan", "sgraf", "chan", "esl", "hrem", "lhsc", "cefg", "aahr"}
SPECS = REPO_ROOT.parent / "shared" / "methods"
PROTOCOL_NAMES = {
    "Flickr30K 1K": "f30k-1k", "Flickr30K": "f30k-1k", "COCO 5-fold 1K": "coco-5fold-1k", "COCO 1K": "coco-5fold-1k",
    "COCO 5K": "coco-5k",
}  # fmt: skip


def test_every_method_has_rows_and_the_registry_methods_are_covered():
    frame = reported_results()
    assert set(frame["method"]) == NINE
    from itmkit.methods.registry import available_methods

    assert set(available_methods()) <= NINE
    placeholder = frame[frame["source"] == "not found"]
    assert set(placeholder["method"]) == {"lhsc"}  # the one spec whose numbers could not be found
    assert placeholder[RECALL_COLUMNS + ["rsum"]].isna().all().all()  # no invented numbers


def test_rsum_matches_the_six_recalls_where_all_are_given():
    frame = reported_results()
    full = frame[frame[RECALL_COLUMNS + ["rsum"]].notna().all(axis=1)]
    assert len(full) > 50
    deviation = (full[RECALL_COLUMNS].sum(axis=1) - full["rsum"]).abs()
    bad = full[deviation > RSUM_ROUNDING + 1e-9]
    assert bad.empty, bad[["method", "label", "rsum"]]


def test_column_types_and_values():
    frame = reported_results()
    assert list(frame.columns) == [*COLUMNS, "label"]
    for column in [*RECALL_COLUMNS, "rsum"]:
        assert frame[column].dtype == float
    assert frame[RECALL_COLUMNS].stack().dropna().between(0, 100).all()
    for column in ("method", "model", "dataset", "protocol", "text", "source", "spec"):
        assert frame[column].map(lambda v: isinstance(v, str) and v != "").all(), column
    assert set(frame["ensemble"]) <= {"single", "ensemble", "unknown"}
    assert frame["spec"].str.match(r"^[a-z]+\.md §[0-9A-Z.]+$").all()
    assert frame["label"].is_unique
    # R@1 <= R@5 <= R@10 wherever they are given (catches swapped columns)
    for side in ("i2t", "t2i"):
        r1, r5, r10 = (frame[f"{side}_r{k}"] for k in (1, 5, 10))
        assert not (r1 > r5).any() and not (r5 > r10).any()


def test_filters_and_errors():
    esl = reported_results("esl", "flickr30k")
    assert set(esl["model"]) == {"ESL-H", "ESL-A"} and set(esl["protocol"]) == {"f30k-1k"}
    bert = reported_results(["vse_infty", "chan"], "coco", text="bert", protocol="coco-5k")
    assert set(bert["method"]) == {"vse_infty", "chan"} and (bert["text"] == "bert").all()
    assert len(reported_results("lhsc", with_numbers=True)) == 0
    with pytest.raises(KeyError, match="method"):
        reported_results("esl-h")
    with pytest.raises(KeyError, match="dataset"):
        reported_results("esl", "imagenet")


# ------------------------------------------------------------ spot checks against the specs
def spec_table(name: str, after: str) -> list[list[str]]:
    """The body rows (cells, bold marks removed) of the first markdown table after ``after``."""
    path = SPECS / name
    if not path.is_file():
        pytest.skip(f"method specs not present at {SPECS}")
    text = path.read_text(encoding="utf-8")
    start = text.index(after)
    rows, started = [], False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            started = True
            cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif started:
            break
    return rows[1:]  # drop the header


def number(cell: str) -> float:
    return float(re.match(r"[0-9.]+", cell).group(0))


def csv_row(method, model, protocol, source, text=None):
    frame = reported_results(method, protocol=protocol, source=source, text=text)
    frame = frame[frame["model"] == model]
    assert len(frame) == 1, (method, model, protocol, source, frame)
    return frame.iloc[0]


def test_esl_rows_equal_the_spec_table():
    rows = spec_table("esl.md", "## 6. Reported results")
    assert len(rows) == 6
    for data, model, *values in rows:
        row = csv_row("esl", model, PROTOCOL_NAMES[data], "readme")
        assert [row[c] for c in RECALL_COLUMNS + ["rsum"]] == [number(v) for v in values]


def test_sgraf_readme_and_aahr_rows_equal_the_spec_tables():
    rows = spec_table("sgraf.md", "### 6.2 README")
    assert len(rows) == 9
    for data, model, *values in rows:
        row = csv_row("sgraf", model, PROTOCOL_NAMES[data], "readme")
        assert [row[c] for c in RECALL_COLUMNS + ["rsum"]] == [number(v) for v in values]
    rows = spec_table("aahr.md", "## 6. Reported results")
    assert len(rows) == 3
    for data, *values in rows:
        row = csv_row("aahr", "AAHR", PROTOCOL_NAMES[data], "readme")
        assert [row[c] for c in RECALL_COLUMNS + ["rsum"]] == [number(v) for v in values]


def test_scan_vse_and_cefg_spot_checks():
    f30k = {r[0]: r[1:] for r in spec_table("scan.md", "Flickr30K 1K test")}
    row = csv_row("scan", "t-i AVG (λ1 9)", "f30k-1k", "paper")
    assert [row[c] for c in RECALL_COLUMNS + ["rsum"]] == [number(v) for v in f30k["t-i AVG (λ1 9)"]]
    ensemble = csv_row("scan", "t-i AVG + i-t LSE", "f30k-1k", "paper")
    assert ensemble["ensemble"] == "ensemble" and ensemble["rsum"] == number(f30k["ensemble t-i AVG + i-t LSE"][-1])

    vse = {(r[0], r[1]): r[2:] for r in spec_table("baselines.md", "## E. Reported results")}
    row = csv_row("vse_infty", "VSE∞", "coco-5fold-1k", "readme", text="bert")
    assert [row[c] for c in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")] == [number(v) for v in vse[("COCO 5-fold 1K", "BERT-base")]]
    assert math.isnan(row["i2t_r10"]) and math.isnan(row["rsum"])  # not in the README: left empty

    cefg = {(r[0], r[1]): r[2:] for r in spec_table("cefg.md", "## 6. Reported results")}
    row = csv_row("cefg", "CEFG", "coco-5fold-1k", "readme", text="bigru")
    assert [row[c] for c in RECALL_COLUMNS + ["rsum"]] == [number(v) for v in cefg[("COCO 5-fold 1K", "Bi-GRU")]]


# ----------------------------------------------------------------------- file and helpers
def test_shipped_file_is_package_data_and_bad_files_are_named(tmp_path):
    assert results_file().parent.name == "itmkit" and results_file().is_file()
    good = pd.read_csv(results_file(), dtype=str, keep_default_na=False)
    bad = good.copy()
    bad.loc[3, "t2i_r5"] = "8O.1"  # a typo: letter O
    path = tmp_path / "reported.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(DataFormatError, match=r"row 5, column 't2i_r5'.*a number"):
        read_reported_csv(path)
    bad = good.copy()
    first_f30k = int(good.index[good["dataset"] == "f30k"][0])
    bad.loc[first_f30k, "protocol"] = "coco-5k"  # dataset f30k with a COCO protocol
    bad.to_csv(path, index=False)
    with pytest.raises(DataFormatError, match=f"row {first_f30k + 2}, column 'dataset'"):
        read_reported_csv(path)
    good.drop(columns=["rsum"]).to_csv(path, index=False)
    with pytest.raises(DataFormatError, match="rsum"):
        read_reported_csv(path)


def test_compare_with_reported_places_ours_first_and_computes_gaps():
    ours = pd.DataFrame([
        {"protocol": "f30k-1k", "fold": "all", "i2t_r1": 50.0, "i2t_r5": 80.0, "i2t_r10": 90.0,
         "t2i_r1": 40.0, "t2i_r5": 70.0, "t2i_r10": 80.0, "rsum": 410.0},
    ])  # fmt: skip
    table = compare_with_reported(ours, "esl", "f30k", label="ESL-H (ours)")
    assert list(table["source"]) == ["ours", "readme", "readme"]
    assert table.loc[0, "label"] == "ESL-H (ours)" and math.isnan(table.loc[0, "rsum_gap"])
    gaps = dict(zip(table["label"], table["rsum_gap"]))
    assert gaps["ESL-H"] == pytest.approx(523.7 - 410.0) and gaps["ESL-A"] == pytest.approx(522.4 - 410.0)
    # embedded-set results use the "test" protocol: shown beside, no gap
    embedded = compare_with_reported({**{c: 10.0 for c in RECALL_COLUMNS}, "protocol": "test"}, "chan", "f30k")
    assert embedded.loc[0, "rsum"] == 60.0 and embedded["rsum_gap"].isna().all()


def test_plot_recalls_shows_reported_rows_beside_ours():
    from itmkit.figures.curves import plot_recalls

    ours = {c: v for c, v in zip(RECALL_COLUMNS, [20.0, 50.0, 70.0, 15.0, 40.0, 60.0])}
    table = compare_with_reported(ours, "chan", "f30k", label="CHAN (ours)")
    fig = plot_recalls(table, title="CHAN: ours vs reported")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == list(table["label"])  # one bar per row, none averaged away
    # the plot's own "reported" argument works with reported_results(...) too (labels are unique)
    fig = plot_recalls(pd.DataFrame([{**ours, "model": "ESL-H (ours)"}]),
                       reported=reported_results("esl", "f30k").assign(model=lambda f: f["label"]))  # fmt: skip
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["ESL-H (ours)", "ESL-H (paper)", "ESL-A (paper)"]
