"""The evaluator end to end at Flickr30K's real test shape (1000 x 36 x 2048, 5,000 captions),
memory-mapped, with a reduced-size VSE∞ (benchmarks/eval_f30k_shapes.py at small dims)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from itmkit.evaluate.metrics import recall_metrics

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "eval_f30k_shapes.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("eval_f30k_shapes", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_f30k_shaped_evaluation(tmp_path):
    bench = load_benchmark()
    stats = bench.run(tmp_path, embed_size=32, word_dim=16, batch_size=256)
    assert stats["sims_shape"] == (1000, 5000)
    assert stats["features_memmapped"]
    assert stats["features_mb"] == pytest.approx(1000 * 36 * 2048 * 4 / 2**20)
    sims = np.load(tmp_path / "eval" / "sims.npy", mmap_mode="r")
    assert sims.shape == (1000, 5000) and sims.dtype == np.float32
    # the saved metrics are those of the saved matrix
    assert stats["rsum"] == pytest.approx(recall_metrics(sims)["rsum"])
    # an untrained model is near chance: R@10 of 1,000 images is 1 %, so rsum stays small
    assert stats["rsum"] < 60
