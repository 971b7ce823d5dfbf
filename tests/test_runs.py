"""``load_run`` with Hugging Face text: train -> save -> reload gives the same model and pipeline.

Every smoke and course preset uses the BiGRU, while the paper BERT presets of VSE∞, CHAN and ESL
reload only through this path (the text pipeline stored as ``{"kind": "hf", ...}`` in the
checkpoint, the fine-tuned transformer in the state dict). A one-epoch run of each on a tiny
synthetic set with the offline MiniLM, reloaded, must score the test split exactly as the
trained model did.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from itmkit.config import replace_nested
from itmkit.data.precomp import PrecompSplit
from itmkit.data.text import HFTokenizerPipeline, default_hf_path
from itmkit.evaluate.evaluator import evaluate_model
from itmkit.evaluate.synthetic_precomp import write_synthetic_precomp
from itmkit.methods.registry import get_method
from itmkit.runs import load_run
from itmkit.train.checkpoint import load_checkpoint
from itmkit.train.trainer import train

# 8 word pieces with [CLS]/[SEP]: most template captions are longer, so a reloaded pipeline that
# lost the run's max_tokens (default 64) would tokenise them differently
MAX_TOKENS = 8


def _hf_run_config(method: str, data_dir):
    cfg = get_method(method).presets["smoke"]()
    return replace_nested(cfg, {
        "data.data_dir": str(data_dir), "text.kind": "hf", "text.hf_path": None, "text.max_tokens": MAX_TOKENS,
        "train.epochs": 1, "train.batch_size": 20, "train.lr_decay_epochs": (), "train.device": "cpu",
        "train.eval_batch_size": 20,
    })  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vse_infty", "chan", "esl"])
def test_hf_text_run_trains_saves_and_reloads_to_the_same_scores(method, tmp_path):
    cfg = _hf_run_config(method, tmp_path / "data")
    data_dir = write_synthetic_precomp(tmp_path / "data", {"train": 8, "dev": 4, "test": 4},
                                       feature_dim=cfg.model.img_dim)  # fmt: skip
    out = tmp_path / "run"
    result = train(cfg, out, progress=False)
    assert result.finished and isinstance(result.pipeline, HFTokenizerPipeline)

    stored = load_checkpoint(out / "model_best.pt")["text_pipeline"]
    assert stored == {"kind": "hf", "path": None, "max_tokens": MAX_TOKENS}

    model, run_cfg, pipeline = load_run(out, device="cpu")
    assert run_cfg.text.kind == "hf" and run_cfg.method == method
    assert isinstance(pipeline, HFTokenizerPipeline)
    assert pipeline.path == default_hf_path() and pipeline.max_tokens == MAX_TOKENS
    captions = PrecompSplit.open(data_dir, "test").captions
    assert any(len(result.pipeline.encode(c)) == MAX_TOKENS for c in captions)  # truncation is exercised
    assert [pipeline.encode(c) for c in captions] == [result.pipeline.encode(c) for c in captions]

    # the fine-tuned transformer comes from the checkpoint, not from the MiniLM folder
    from transformers import AutoModel

    pretrained = AutoModel.from_pretrained(default_hf_path(), local_files_only=True).state_dict()
    reloaded = {k.split(".backbone.", 1)[1]: v for k, v in model.state_dict().items() if ".backbone." in k}
    assert reloaded.keys() == pretrained.keys()
    assert any(not torch.equal(reloaded[k], pretrained[k]) for k in pretrained), "backbone not fine-tuned"
    trained = result.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value.cpu(), trained[key].cpu()), key

    # the same similarity matrix as the trained model's, and as the run's saved test evaluation
    again = evaluate_model(model, data_dir, "test", pipeline, progress=False)
    before = evaluate_model(result.model.eval(), data_dir, "test", result.pipeline, progress=False)
    np.testing.assert_allclose(np.asarray(again.sims), np.asarray(before.sims), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(again.sims), np.load(out / "test" / "sims.npy"), rtol=1e-5, atol=1e-6)
    saved = pd.read_csv(out / "test_metrics.csv")
    assert again.metrics["rsum"].iloc[0] == pytest.approx(saved["rsum"].iloc[0])


def test_run_table_reads_each_results_summary_row():
    from types import SimpleNamespace

    import pandas as pd

    from itmkit.runs import run_table

    names = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
    folds = pd.DataFrame([{"fold": "0", **{n: 1.0 for n in names}}, {"fold": "mean", **{n: float(i) for i, n in enumerate(names)}}])
    whole = pd.DataFrame([{"fold": "all", **{n: 2.0 for n in names}}])
    runs = {"a": SimpleNamespace(test_metrics=folds, seconds=3.5, best_epoch=2),
            "b": SimpleNamespace(test_metrics=whole, seconds=9.0, best_epoch=1)}
    table = run_table(runs, seconds={"b": 4.0})
    assert table.loc["a", "rsum"] == 6.0 and table.loc["a", "i2t_r1"] == 0.0 and table.loc["b", "t2i_r10"] == 2.0
    assert table.loc["a", "train_seconds"] == 3.5 and table.loc["b", "train_seconds"] == 4.0
    assert table.loc["a", "best_epoch"] == 2
