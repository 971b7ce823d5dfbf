"""What an evaluation returns and writes: the similarity matrix and a metrics table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from itmkit.evaluate.atomic_write import write_csv, write_json
from itmkit.evaluate.protocols import summary_rows
from itmkit.evaluate.similarity_file import save_similarity


@dataclass
class EvalResult:
    """``sims [n_img, n_cap]`` and ``metrics`` (one row per protocol and fold, ``METRIC_COLUMNS``)."""

    sims: np.ndarray
    metrics: pd.DataFrame
    out_dir: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def summary(self) -> pd.DataFrame:
        """One row per protocol (the whole-matrix row or the 5-fold mean)."""
        return summary_rows(self.metrics)

    def metric(self, name: str = "rsum", protocol: str | None = None) -> float:
        rows = self.summary if protocol is None else self.summary[self.summary["protocol"] == protocol]
        if rows.empty:
            raise KeyError(f"no metrics for protocol {protocol!r}; have {self.summary['protocol'].tolist()}")
        return float(rows.iloc[0][name])

    def save(self, out_dir, save_sims: bool = True) -> Path:
        """Write ``metrics.csv``, ``metrics.json`` (flat summary + info) and ``sims.npy``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "metrics.csv", self.metrics)
        flat = {}
        for _, row in self.summary.iterrows():
            for key, value in row.items():
                if key not in ("protocol", "fold"):
                    flat[f"{row['protocol']}/{key}"] = value
        write_json(out / "metrics.json", {"metrics": flat, "info": self.info})
        if save_sims:
            save_similarity(out / "sims.npy", self.sims)
        self.out_dir = out
        return out
