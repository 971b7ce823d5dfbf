"""Reported numbers as data (itmkit/reported_results.csv): coverage of the nine specs, rsum
consistency, types, every numeric row against the spec text itself, the comparison helper and its plot."""

import math
import re

import matplotlib
import pandas as pd
import pytest

from itmkit.data.errors import DataFormatError
from itmkit.paths import method_specs_dir
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
SPECS = method_specs_dir()


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


# ------------------------------------------- every numeric row against its source text
# The specs quote their numbers in markdown tables of several layouts (one recall per column,
# "R@1/5/10" cells, "rsum (R@1 i2t / t2i)" cells, one column group per protocol) and, for
# sgraf.md §6.3, in prose ("f30k SAF 73.5/90.5/95.5 | 53.1/78.7/85.4 (rsum 476.7)"). The parser
# below turns each into records {protocol, model, text, values}, where the value names carry
# their direction (i2t / t2i) from the header: a CSV row with the two directions swapped, the
# wrong protocol or a mistyped number finds no record.
def parse_protocol(text: str) -> str | None:
    t = text.lower().replace("ms-coco", "coco").replace(" ", "")
    if "coco" in t:
        return "coco-5fold-1k" if "1k" in t else "coco-5k" if "5k" in t else None
    return "f30k-1k" if "flickr" in t or "f30k" in t else None


def parse_text(cell: str) -> str | None:
    t = cell.lower()
    return "bigru" if "gru" in t else "bert" if "bert" in t else None


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", cell)]


def header_columns(header: list[str]) -> list[tuple[str, str | None, list[str]]]:
    """``(role, protocol or None, value names)`` per column; role ``model``, ``text``,
    ``protocol`` or ``values``. A direction (i2t / t2i) or protocol named in a header holds for
    the columns to its right until another is named."""
    columns, direction, protocol = [], None, None
    for cell in header:
        low = cell.lower()
        if low in ("model", "method"):
            columns.append(("model", None, []))
            continue
        if low == "text":
            columns.append(("text", None, []))
            continue
        if low in ("data", "dataset", "data / protocol"):
            columns.append(("protocol", None, []))
            continue
        protocol = parse_protocol(cell) or protocol
        direction = "i2t" if "i2t" in low and "t2i" not in low else "t2i" if "t2i" in low and "i2t" not in low else direction
        ks = re.search(r"r@([0-9/]+)", low)
        if "rsum" in low:
            names = ["rsum", "i2t_r1", "t2i_r1"] if ks else ["rsum"]  # "rsum (R@1 i2t / t2i)"
        else:
            if direction is None:
                raise ValueError(f"spec table header {header}: column {cell!r} names no direction")
            names = [f"{direction}_r{k}" for k in (ks.group(1).split("/") if ks else ("1", "5", "10"))]
        columns.append(("values", protocol, names))
    return columns


def table_records(lines: list[str], context: str | None, where: str) -> list[dict]:
    """Records of one markdown table (``lines``: header, separator, body); ``context`` is the line
    above the table (scan.md names the protocol there)."""
    split = lambda line: [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]  # noqa: E731
    columns = header_columns(split(lines[0]))
    records = []
    for n, line in enumerate(lines[2:], start=3):
        cells = split(line)
        if len(cells) != len(columns):
            raise ValueError(f"{where}: table line {n} has {len(cells)} cells for {len(columns)} columns: {line}")
        base = {"model": None, "text": None, "protocol": parse_protocol(context or "")}
        by_protocol: dict[str | None, dict[str, float]] = {}
        for (role, protocol, names), cell in zip(columns, cells):
            if role == "model":
                base["model"] = cell
            elif role == "text":
                base["text"] = parse_text(cell)
            elif role == "protocol":
                base["protocol"] = parse_protocol(cell)
            else:
                found = numbers(cell)
                if found and len(found) != len(names):
                    raise ValueError(f"{where}: cell {cell!r} holds {len(found)} numbers for {names}")
                by_protocol.setdefault(protocol, {}).update(zip(names, found))
        for protocol, values in by_protocol.items():
            records.append({**base, "protocol": protocol or base["protocol"], "values": values,
                            "where": f"{where}, table line {n}"})  # fmt: skip
    return records


PROSE_ROW = re.compile(
    r"(?:(?P<protocol>f30k|COCO 1K|COCO 5K)\s+)?(?P<model>[A-Za-z][\w+*-]*)\s+"
    r"(?P<i2t>\d+\.\d/\d+\.\d/\d+\.\d)\s*\|\s*(?P<t2i>\d+\.\d/\d+\.\d/\d+\.\d)(?:\s*\((?:rsum\s+)?(?P<rsum>\d+\.\d)\))?"
)


def prose_records(text: str, where: str) -> list[dict]:
    """Rows written as ``[protocol] MODEL i2t1/5/10 | t2i1/5/10 [(rsum X)]``; the protocol holds
    until another is named."""
    records, protocol = [], None
    for match in PROSE_ROW.finditer(text):
        protocol = parse_protocol(match["protocol"]) if match["protocol"] else protocol
        values = dict(zip(["i2t_r1", "i2t_r5", "i2t_r10"], numbers(match["i2t"])))
        values.update(zip(["t2i_r1", "t2i_r5", "t2i_r10"], numbers(match["t2i"])))
        if match["rsum"]:
            values["rsum"] = float(match["rsum"])
        records.append({"model": match["model"], "text": None, "protocol": protocol, "values": values,
                        "where": f"{where}, prose {match.group(0)!r}"})  # fmt: skip
    return records


def section_lines(text: str, number: str, where: str) -> list[str]:
    """The lines of section ``number`` (``"6"``, ``"6.2"``, ``"E"``) up to the next heading of
    the same or a higher level."""
    lines = text.splitlines()
    heading = re.compile(r"^(#+)\s+([0-9A-Z]+(?:\.[0-9]+)*)\.?\s")
    for start, line in enumerate(lines):
        m = heading.match(line)
        if m and m.group(2) == number:
            level = len(m.group(1))
            end = next((j for j in range(start + 1, len(lines))
                        if (h := heading.match(lines[j]) or re.match(r"^(#+)\s", lines[j])) and len(h.group(1)) <= level),
                       len(lines))  # fmt: skip
            return lines[start:end]
    raise ValueError(f"{where}: no section {number}")


SPEC_OWNERS = {"baselines.md": "vse_infty"}  # the method a spec file is about (else its stem)


def spec_records(spec: str) -> list[dict]:
    """Every record quoted in ``spec`` (``"sgraf.md §6.2"``)."""
    name, number = spec.split(" §")
    path = SPECS / name
    if not path.is_file():
        pytest.skip(f"method specs not present at {SPECS} (set ITMKIT_SPECS)")
    lines = section_lines(path.read_text(encoding="utf-8"), number, spec)
    records, prose, i = [], [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            context = lines[i - 1] if i > 0 and not lines[i - 1].startswith("#") else None
            records += table_records(lines[i:j], context, spec)
            i = j
        else:
            prose.append(lines[i])
            i += 1
    records += prose_records(" ".join(prose), spec)
    owner = SPEC_OWNERS.get(name, name.removesuffix(".md"))
    return [{**r, "owner": owner} for r in records]


def model_key(name: str) -> str:
    return re.sub(r"[^0-9a-zλ+*-]", "", re.sub(r"\(ens\.\)|ensemble", "", name.lower()))


def model_matches(csv_model: str, spec_model: str) -> bool:
    """The spec's row name is the CSV's, up to punctuation and an "ensemble" tag, or the CSV's
    parenthesised alias ("VSE∞ (GPO)" is row "GPO" of a comparison table)."""
    aliases = {model_key(csv_model)} | {model_key(a) for a in re.findall(r"\(([^)]*)\)", csv_model)}
    return model_key(spec_model) in aliases


def unmatched_rows(frame: pd.DataFrame) -> list[str]:
    problems = []
    cache: dict[str, list[dict]] = {}
    for _, row in frame.iterrows():
        given = {c: float(row[c]) for c in [*RECALL_COLUMNS, "rsum"] if not math.isnan(row[c])}
        if not given:
            continue
        records = cache.setdefault(row["spec"], spec_records(row["spec"]))
        # a table without a model column speaks of the spec's own method
        candidates = [r for r in records if r["protocol"] == row["protocol"] and r["text"] in (None, row["text"])
                      and (model_matches(row["model"], r["model"]) if r["model"] else row["method"] == r["owner"])]  # fmt: skip
        found = [r for r in candidates if r["values"] == given]
        if not found:
            problems.append(f"{row['label']} [{row['protocol']}, {row['text']}, {row['spec']}]: {given}; "
                            f"spec has {[(r['values'], r['where']) for r in candidates]}")  # fmt: skip
        elif re.search(r"ensemble|\(ens\.\)|\*", f"{found[0]['model']} {row['model']}") and row["ensemble"] != "ensemble":
            problems.append(f"{row['label']}: the spec's row is an ensemble ({found[0]['where']}), "
                            f"the CSV says {row['ensemble']!r}")  # fmt: skip
    return problems


def test_spec_parser_on_a_hand_written_section():
    text = """## 6. Reported results
Flickr30K 1K test
| model | i2t R@1 | R@5 | t2i R@1 | R@5 | rsum |
| --- | --- | --- | --- | --- | --- |
| **A** (ens.) | 1.0 | 2.0 | 3.0 | 4.0 | 10.0 |
| method | F30K i2t R@1/5/10 | F30K t2i R@1/5/10 | rSum | COCO5K i2t | COCO5K t2i | rSum |
| --- | --- | --- | --- | --- | --- | --- |
| B | 1.0/2.0/3.0 | 4.0/5.0/6.0 | 21.0 | 7.0/8.0/9.0 | – | 24.0 |
| model | coco 1K rsum (R@1 i2t / t2i) |
| --- | --- |
| C | 50.5 (30.0 / 20.5) |
COCO 1K D 1.1/2.2/3.3 | 4.4/5.5/6.6 (rsum 23.1); E 9.0/9.1/9.2 | 8.0/8.1/8.2.
## 7. Next
| model | i2t R@1 |
| --- | --- |
| F | 99.0 |
"""
    lines = section_lines(text, "6", "t.md §6")
    tables = [i for i, line in enumerate(lines) if line.startswith("| model") or line.startswith("| method")]
    a = table_records(lines[tables[0]:tables[0] + 3], lines[tables[0] - 1], "t")
    assert a == [{"model": "A (ens.)", "text": None, "protocol": "f30k-1k", "where": "t, table line 3",
                  "values": {"i2t_r1": 1.0, "i2t_r5": 2.0, "t2i_r1": 3.0, "t2i_r5": 4.0, "rsum": 10.0}}]  # fmt: skip
    b = table_records(lines[tables[1]:tables[1] + 3], None, "t")
    assert [(r["protocol"], r["values"]) for r in b] == [
        ("f30k-1k", {"i2t_r1": 1.0, "i2t_r5": 2.0, "i2t_r10": 3.0, "t2i_r1": 4.0, "t2i_r5": 5.0, "t2i_r10": 6.0,
                     "rsum": 21.0}),
        ("coco-5k", {"i2t_r1": 7.0, "i2t_r5": 8.0, "i2t_r10": 9.0, "rsum": 24.0}),  # "–": not given
    ]  # fmt: skip
    c = table_records(lines[tables[2]:tables[2] + 3], None, "t")
    assert (c[0]["protocol"], c[0]["values"]) == ("coco-5fold-1k", {"rsum": 50.5, "i2t_r1": 30.0, "t2i_r1": 20.5})
    prose = prose_records(" ".join(lines), "t")
    assert [(r["model"], r["protocol"], r["values"]["i2t_r10"], r["values"]["t2i_r1"], r["values"].get("rsum"))
            for r in prose] == [("D", "coco-5fold-1k", 3.3, 4.4, 23.1), ("E", "coco-5fold-1k", 9.2, 8.0, None)]  # fmt: skip
    assert not any("99.0" in line for line in lines)  # section 7 is not part of section 6
    assert model_matches("A", "A (ens.)") and model_matches("VSE∞ (GPO)", "GPO") and not model_matches("B", "A")


def test_every_numeric_row_is_found_in_its_spec_section():
    frame = reported_results()
    numeric = frame[frame[[*RECALL_COLUMNS, "rsum"]].notna().any(axis=1)]
    assert len(numeric) == len(frame) - 1  # all but the LHSC placeholder
    problems = unmatched_rows(numeric)
    assert not problems, "\n".join(problems)


def test_a_direction_swap_or_a_protocol_slip_is_not_found():
    frame = reported_results("esl", "coco", protocol="coco-5k")
    assert unmatched_rows(frame) == []
    swapped = frame.copy()
    for k in (1, 5, 10):
        swapped[f"i2t_r{k}"], swapped[f"t2i_r{k}"] = frame[f"t2i_r{k}"], frame[f"i2t_r{k}"]
    assert len(unmatched_rows(swapped)) == len(frame)
    slipped = frame.assign(protocol="coco-5fold-1k")
    assert len(unmatched_rows(slipped)) == len(frame)


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
