"""The papers' reported numbers as data, and our results placed beside them.

``reported_results.csv`` (shipped in the package) holds every row the method specs in
``../shared/methods/`` quote: VSE∞ (baselines.md §E), SCAN, SGRAF, CHAN, ESL, HREM, LHSC, CEFG and
AAHR (each ``<method>.md`` §6). One row per (method, model row, dataset, protocol, text backbone,
source). Values the source does not give are empty (NaN), never filled in; a method whose numbers
could not be found (LHSC) has a placeholder row with ``source = "not found"`` and no numbers.

Columns (:data:`COLUMNS`):

- ``method``: registry name (``"esl"``; ``"lhsc"``, ``"cefg"``, ... for methods not yet in the kit);
- ``model``: the row's name in its source (``"ESL-H"``, ``"t-i AVG (λ1 9)"``, ``"SGRAF"``);
- ``variant``: our short name for it where one exists (``"H"``, ``"t2i-avg"``, ``"sgr+saf"``);
- ``dataset`` (``f30k`` / ``coco``) and ``protocol`` (:mod:`itmkit.evaluate.protocols` names:
  ``f30k-1k``, ``coco-5fold-1k``, ``coco-5k``);
- ``text`` (``bigru`` / ``bert``), ``features`` (``butd``, ...);
- ``ensemble``: ``single``, ``ensemble`` (two models' matrices averaged) or ``unknown``;
- ``i2t_r1 .. t2i_r10``, ``rsum`` (percent; ``rsum`` as printed, so it can differ from the sum
  of the rounded recalls by up to 0.3);
- ``source`` (``paper``, ``readme``, ``re-run``, ``third-party table``, ``not found``),
  ``source_detail``, ``spec`` (file and section), ``note``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pandas as pd

from itmkit.data.errors import DataFormatError

RECALL_COLUMNS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
NUMBER_COLUMNS = [*RECALL_COLUMNS, "rsum"]
TEXT_COLUMNS = [
    "method", "model", "variant", "dataset", "protocol", "text", "features", "ensemble",
    "source", "source_detail", "spec", "note",
]  # fmt: skip
COLUMNS = [*TEXT_COLUMNS[:8], *NUMBER_COLUMNS, *TEXT_COLUMNS[8:]]
ENSEMBLE_VALUES = ("single", "ensemble", "unknown")
SOURCE_VALUES = ("paper", "readme", "re-run", "third-party table", "not found")
PROTOCOL_DATASET = {"f30k-1k": "f30k", "coco-5fold-1k": "coco", "coco-5k": "coco"}
DATASET_ALIASES = {
    "f30k": "f30k", "flickr30k": "f30k", "f30k_precomp": "f30k", "flickr": "f30k",
    "coco": "coco", "mscoco": "coco", "ms-coco": "coco", "coco_precomp": "coco",
}  # fmt: skip
# six recalls each rounded to 0.1 (and 5-fold means of unrounded values): the printed rsum may
# differ from the sum of the printed recalls by up to 6 x 0.05
RSUM_ROUNDING = 0.3


def results_file() -> Path:
    """Path of the shipped ``reported_results.csv``."""
    return Path(str(resources.files("itmkit") / "reported_results.csv"))


def read_reported_csv(path: str | Path) -> pd.DataFrame:
    """Read and check a reported-results CSV: every column of :data:`COLUMNS`, numbers numeric in
    [0, 100] (rsum in [0, 600]), known ``ensemble`` / ``source`` / ``protocol`` values, and a
    ``dataset`` that matches the protocol. Raises :class:`DataFormatError` naming the row."""
    path = Path(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataFormatError(path, "header", f"the columns {COLUMNS}", f"no column(s) {missing}")
    frame = frame[COLUMNS].copy()
    for column in NUMBER_COLUMNS:
        values = pd.to_numeric(frame[column].replace("", None), errors="coerce")
        bad = frame[column].ne("") & values.isna()
        if bad.any():
            row = int(bad.idxmax())
            raise DataFormatError(path, f"row {row + 2}, column {column!r}", "a number or an empty cell",
                                  repr(frame.at[row, column]))  # fmt: skip
        top = 600.0 if column == "rsum" else 100.0
        out = values.notna() & ((values < 0) | (values > top))
        if out.any():
            row = int(out.idxmax())
            raise DataFormatError(path, f"row {row + 2}, column {column!r}", f"a percentage in [0, {top:g}]", values[row])
        frame[column] = values.astype(float)
    checks = {"ensemble": ENSEMBLE_VALUES, "source": SOURCE_VALUES, "protocol": tuple(PROTOCOL_DATASET)}
    for column, allowed in checks.items():
        bad = ~frame[column].isin(allowed)
        if bad.any():
            row = int(bad.idxmax())
            raise DataFormatError(path, f"row {row + 2}, column {column!r}", f"one of {list(allowed)}", repr(frame.at[row, column]))
    wrong = frame["dataset"] != frame["protocol"].map(PROTOCOL_DATASET)
    if wrong.any():
        row = int(wrong.idxmax())
        raise DataFormatError(path, f"row {row + 2}, column 'dataset'",
                              f"{PROTOCOL_DATASET[frame.at[row, 'protocol']]!r} (protocol {frame.at[row, 'protocol']})",
                              repr(frame.at[row, "dataset"]))  # fmt: skip
    return frame


@lru_cache(maxsize=1)
def _shipped() -> pd.DataFrame:
    return read_reported_csv(results_file())


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def normalise_dataset(name: str) -> str:
    """``"flickr30k"``, ``"f30k_precomp"``, ... -> ``"f30k"``; ``"mscoco"`` -> ``"coco"``."""
    key = str(name).lower()
    if key not in DATASET_ALIASES:
        raise KeyError(f"reported results: dataset {name!r}: expected one of {sorted(set(DATASET_ALIASES))}")
    return DATASET_ALIASES[key]


def reported_results(
    method: str | Iterable[str] | None = None,
    dataset: str | Iterable[str] | None = None,
    *,
    protocol: str | Iterable[str] | None = None,
    text: str | Iterable[str] | None = None,
    source: str | Iterable[str] | None = None,
    ensemble: str | Iterable[str] | None = None,
    with_numbers: bool = False,
) -> pd.DataFrame:
    """The reported rows, filtered (each filter a value or a list; ``None`` keeps all).

    ``with_numbers=True`` drops rows without any recall (placeholders). Adds ``label``: a name
    unique within the result (model, text, protocol, source), for tables and plots.
    """
    frame = _shipped().copy()
    filters = {
        "method": _as_list(method),
        "dataset": None if dataset is None else [normalise_dataset(d) for d in _as_list(dataset)],
        "protocol": _as_list(protocol),
        "text": _as_list(text),
        "source": _as_list(source),
        "ensemble": _as_list(ensemble),
    }
    for column, wanted in filters.items():
        if wanted is None:
            continue
        known = set(_shipped()[column])
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise KeyError(f"reported results: {column} {unknown}: expected one of {sorted(known)}")
        frame = frame[frame[column].isin(wanted)]
    if with_numbers:
        frame = frame[frame[RECALL_COLUMNS].notna().any(axis=1)]
    frame = frame.reset_index(drop=True)
    frame["label"] = _labels(frame)
    return frame


def _labels(frame: pd.DataFrame) -> pd.Series:
    """Short unique names: the model, then those of text, protocol, source that vary, as needed."""
    parts = ["model"]
    labels = frame["model"].astype(str)
    for column in ("text", "protocol", "source"):
        if labels.is_unique:
            return labels
        if frame[column].nunique() > 1:
            parts.append(column)
            labels = frame[parts].astype(str).agg(" · ".join, axis=1)
    return labels if labels.is_unique else labels + [f" #{i + 1}" for i in range(len(frame))]


def _our_rows(ours: pd.DataFrame | Mapping[str, float], label: str) -> pd.DataFrame:
    frame = pd.DataFrame([dict(ours)]) if isinstance(ours, Mapping) else ours.copy()
    if "fold" in frame.columns:  # an evaluator metrics table: the whole-matrix row or the 5-fold mean
        frame = frame[frame["fold"].astype(str).isin(["all", "mean"])]
    missing = [c for c in RECALL_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"compare_with_reported: our metrics: expected the columns {RECALL_COLUMNS}, missing {missing}")
    if "rsum" not in frame.columns:
        frame["rsum"] = frame[RECALL_COLUMNS].sum(axis=1)
    frame = frame.reset_index(drop=True)
    if "protocol" in frame.columns and len(frame) > 1:
        frame["label"] = [f"{label} · {p}" for p in frame["protocol"]]
    else:
        frame["label"] = label
    frame["source"] = "ours"
    return frame


def compare_with_reported(
    our_metrics: pd.DataFrame | Mapping[str, float],
    method: str | Iterable[str],
    dataset: str | Iterable[str] | None = None,
    *,
    label: str = "ours",
    text: str | Iterable[str] | None = None,
    protocol: str | Iterable[str] | None = None,
    source: str | Iterable[str] | None = None,
) -> pd.DataFrame:
    """Our recalls first, then the papers' rows of ``method`` (and ``dataset`` ...), one table.

    ``our_metrics``: an evaluator metrics table (rows with ``fold`` ``all`` / ``mean`` are used),
    summary rows, or one mapping ``{"i2t_r1": ..., ...}``. Returns columns ``label``, ``source``
    (``ours`` or the reported source), ``method``, ``protocol``, ``text``, ``ensemble``, the six
    recalls, ``rsum`` and ``rsum_gap`` (reported rsum minus ours, when our protocol matches the
    row's, else NaN), plus ``model = label`` so :func:`itmkit.figures.curves.plot_recalls` draws one bar
    per row.
    """
    ours = _our_rows(our_metrics, label)
    theirs = reported_results(method, dataset, text=text, protocol=protocol, source=source, with_numbers=True)
    table = pd.concat([ours, theirs], ignore_index=True, sort=False)
    for column in ("method", "protocol", "text", "ensemble"):
        if column not in table.columns:
            table[column] = pd.NA
    gaps = []
    for _, row in table.iterrows():
        same = ours[ours["protocol"] == row["protocol"]] if "protocol" in ours.columns else ours.iloc[0:0]
        gaps.append(float(row["rsum"]) - float(same["rsum"].iloc[0]) if row["source"] != "ours" and len(same) else float("nan"))
    table["rsum_gap"] = gaps
    table["model"] = table["label"]
    columns = ["label", "source", "method", "protocol", "text", "ensemble", *NUMBER_COLUMNS, "rsum_gap", "model"]
    return table[columns]


__all__ = [
    "COLUMNS",
    "RECALL_COLUMNS",
    "compare_with_reported",
    "normalise_dataset",
    "read_reported_csv",
    "reported_results",
    "results_file",
]
