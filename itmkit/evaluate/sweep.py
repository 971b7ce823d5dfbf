"""Score one trained model at several values of a test-time setting, without touching the model.

SCAN's softmax temperature ``λ1`` (scan.md §3) or CHAN's ``belta`` are read from ``model.cfg`` at
scoring time, so a model trained with one value can be *evaluated* with others. The sweep works on
a copy per value: the caller's model keeps its own setting whatever happens (notebook 04 once
changed ``model.cfg`` in place and had to restore it by hand).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import pandas as pd

from itmkit.data.precomp import CAPTIONS_PER_IMAGE
from itmkit.encoded import Encoded
from itmkit.evaluate.evaluator import similarity_matrix
from itmkit.evaluate.metrics import recall_metrics
from itmkit.models.base import MatchingModel


def with_setting(model: MatchingModel, name: str, value: Any) -> MatchingModel:
    """A copy of ``model`` (same weights) whose ``model.cfg.<name>`` is ``value``."""
    if not hasattr(model.cfg, name):
        raise AttributeError(f"{type(model).__name__}.cfg has no setting {name!r}")
    twin = copy.deepcopy(model)
    setattr(twin.cfg, name, value)
    return twin


def recalls_by_setting(model: MatchingModel, images: Encoded, captions: Encoded, name: str, values: Sequence[Any],
                       captions_per_image: int = CAPTIONS_PER_IMAGE) -> pd.DataFrame:  # fmt: skip
    """Recalls (``recall_metrics``) of the encoded split at each value of ``model.cfg.<name>``:
    one row per value, the column ``name`` first. ``model`` is left as it was."""
    rows = []
    for value in values:
        sims = similarity_matrix(with_setting(model, name, value), images, captions, progress=False)
        rows.append({name: value, **recall_metrics(sims, captions_per_image)})
    return pd.DataFrame(rows)
