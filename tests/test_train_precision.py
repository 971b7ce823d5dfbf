"""Settings added for GPU training (issue 13): AMP dtype, gradient accumulation, sync BN, the
engine's reduced-precision scoring. CUDA-only behaviour runs where a GPU is present and skips
with the reason otherwise; nothing runs in reduced precision on the CPU."""

import json

import numpy as np
import pytest
import torch

from itmkit.config import ADDED_SETTINGS, identity_json, replace_nested
from itmkit.methods.registry import get_method
from itmkit.train import trainer
from itmkit.train.trainer import RunConfigMismatch, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)")


def _smoke(method="vse_infty", **overrides):
    return replace_nested(get_method(method).preset("smoke"), {"train.epochs": 1, "train.device": "cpu", **overrides})


def test_accumulate_steps_must_leave_two_pairs_per_micro_batch():
    with pytest.raises(ValueError, match="accumulate_steps: 17 micro-batches of a batch of 32 pairs"):
        _smoke(**{"train.accumulate_steps": 17})
    assert _smoke(**{"train.accumulate_steps": 16}).train.accumulate_steps == 16


def test_unknown_amp_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="train.amp_dtype"):
        _smoke(**{"train.amp_dtype": "float8"})


def test_runs_written_before_the_new_settings_still_resume_and_keep_their_names(tmp_path):
    cfg = _smoke()
    train(cfg, tmp_path, progress=False, max_steps=1)
    stored = json.loads((tmp_path / "config.json").read_text())
    for dotted in ADDED_SETTINGS:  # what an older itmkit wrote
        del stored["train"][dotted.split(".")[1]]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert train(cfg, tmp_path, progress=False, max_steps=1).log is not None  # resumes, no mismatch
    # a non-default value of a new setting is a different run
    with pytest.raises(RunConfigMismatch, match=r"train.accumulate_steps: 1 -> 2"):
        train(replace_nested(cfg, {"train.accumulate_steps": 2}), tmp_path, progress=False, max_steps=1)
    # shared-run names hash the config without the new settings at their defaults
    assert json.loads(identity_json(cfg)) == json.loads(json.dumps(stored))
    assert json.loads(identity_json(replace_nested(cfg, {"train.amp_dtype": "bfloat16"})))["train"]["amp_dtype"] == "bfloat16"


def test_reduced_precision_settings_do_nothing_on_the_cpu():
    cfg = _smoke(**{"train.eval_compute_dtype": "float16", "train.amp_dtype": "bfloat16"})
    assert trainer._eval_options(cfg.train, torch.device("cpu")) == {}
    assert trainer._amp_dtype("bfloat16", torch.device("cpu"), use_amp=False) == torch.bfloat16


@needs_cuda
@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_amp_training_on_cuda_is_finite_and_close_to_fp32(tmp_path, amp_dtype):
    if amp_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    runs = {}
    for name, amp in (("fp32", False), (amp_dtype, True)):
        cfg = _smoke("scan", **{"train.device": "cuda", "train.amp": amp, "train.amp_dtype": amp_dtype})
        runs[name] = train(cfg, tmp_path / name, progress=False, max_steps=3)
    amp_ckpt = torch.load(tmp_path / amp_dtype / "checkpoint.pt", weights_only=False)
    # fp16 trains with a gradient scaler, bf16 without one
    assert (amp_ckpt["scaler"].get("scale", 0) > 0) == (amp_dtype == "float16")
    losses = [row["loss"] for row in amp_ckpt["state"]["step_log"]]
    reference = [row["loss"] for row in torch.load(tmp_path / "fp32" / "checkpoint.pt", weights_only=False)["state"]["step_log"]]
    assert np.isfinite(losses).all()
    np.testing.assert_allclose(losses, reference, rtol=0.05)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_engine_reduced_precision_scores_on_cuda_agree_with_fp32(dtype):
    from itmkit.config import TextConfig
    from itmkit.encoded import Encoded
    from itmkit.methods.scan import SCAN, SCANConfig

    torch.manual_seed(0)
    model = SCAN(SCANConfig(embed_size=64, img_dim=64), TextConfig(word_dim=8), vocab_size=50).cuda().eval()
    images = Encoded(torch.nn.functional.normalize(torch.randn(20, 36, 64), dim=-1), torch.full((20,), 36))
    captions = Encoded(torch.nn.functional.normalize(torch.randn(30, 12, 64), dim=-1), torch.randint(3, 13, (30,)))
    full = model.similarity(images, captions, device="cuda")
    reduced = model.similarity(images, captions, device="cuda", compute_dtype=dtype)
    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, full, atol=2e-2, rtol=2e-2)
