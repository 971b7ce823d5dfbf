"""The training-throughput measurement (issue 13 §3): what it times and counts."""

import pytest

from itmkit.config import replace_nested
from itmkit.methods.registry import get_method


def test_throughput_counts_the_timed_batches_pairs():
    from itmkit.data.loaders import PairDataset, train_batches
    from itmkit.data.precomp import PrecompSplit
    from itmkit.data.text import build_text_pipeline
    from itmkit.train.throughput import measure_throughput
    from itmkit.train.trainer import resolve_data_dir

    cfg = replace_nested(get_method("vse_infty").preset("smoke"), {"train.batch_size": 100})
    result = measure_throughput(cfg, steps=2, warmup=1, device="cpu")
    # the same batches the trainer draws: epoch 0 of 240 captions in batches of 100 -> 100, 100, 40
    split = PrecompSplit.open(resolve_data_dir(cfg), "train")
    dataset = PairDataset(split, build_text_pipeline(cfg.text, split.captions, resolve_data_dir(cfg)), seed=cfg.train.seed)
    sizes = [len(b) for b in train_batches(dataset, 100, cfg.train.seed, 0)]
    assert result.pairs == sum(sizes[1:3]) == 140
    assert (result.method, result.batch_size, result.steps, result.device) == ("vse_infty", 100, 2, "cpu")
    assert result.load_pairs_per_s == pytest.approx(result.pairs / result.load_seconds)
    assert result.train_pairs_per_s == pytest.approx(result.pairs / result.train_seconds)
    assert result.ratio == pytest.approx(result.train_pairs_per_s / result.load_pairs_per_s)
    assert result.peak_gpu_mib is None
    more = measure_throughput(cfg, steps=4, warmup=0, device="cpu")  # cycles into epoch 1 after 3 batches
    assert more.pairs == 100 + 100 + 40 + 100
    with pytest.raises(ValueError, match="expected steps >= 1"):
        measure_throughput(cfg, steps=0)


def test_benchmark_script_writes_json(tmp_path):
    import json
    import subprocess
    import sys

    from itmkit.paths import REPO_ROOT

    out = tmp_path / "tp.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "train_throughput.py"), "--preset", "smoke", "--steps", "1",
                    "--warmup", "0", "--methods", "scan", "--threads", "1", "--json", str(out)], check=True, capture_output=True)
    data = json.loads(out.read_text())
    assert [row["method"] for row in data["rows"]] == ["scan"] and data["rows"][0]["train_pairs_per_s"] > 0
