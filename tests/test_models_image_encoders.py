"""PrecompRegionEncoder and MLP (baselines.md §B.2): init, hand-computed forward, padding."""

import math

import pytest
import torch
import torch.nn.functional as F

from itmkit.models.image_encoders import PrecompRegionEncoder
from itmkit.models.mlp import MLP


def regions(lengths, k=None, d=12, seed=0, fill=0.0):
    g = torch.Generator().manual_seed(seed)
    k = k or max(lengths)
    x = torch.full((len(lengths), k, d), fill)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randn(n, d, generator=g)
    return x, torch.tensor(lengths)


def test_fc_init_bound_and_zero_bias():
    torch.manual_seed(0)
    enc = PrecompRegionEncoder(2048, 1024)
    bound = math.sqrt(6 / (2048 + 1024))  # 0.0442 (scan.md §3.1)
    assert enc.fc.weight.abs().max() <= bound and enc.fc.weight.abs().max() > 0.99 * bound
    assert torch.equal(enc.fc.bias, torch.zeros(1024))
    names = set(enc.state_dict())
    assert {"mlp.layers.0.weight", "mlp.layers.1.weight", "mlp.bns.0.running_mean", "mlp.bns.1.running_var"} <= names
    assert enc.mlp.layers[0].weight.shape == (512, 2048) and enc.mlp.bns[1].weight.shape == (1024,)


def test_eval_forward_matches_hand_computation():
    torch.manual_seed(1)
    enc = PrecompRegionEncoder(12, 8).eval()
    with torch.no_grad():  # non-trivial BN statistics so the formula is really exercised
        bn = enc.mlp.bns[0]
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5), enc.fc.bias.uniform_(-0.1, 0.1)
    x, lengths = regions([3, 2])
    out = enc(x, lengths)
    assert out.shape == (2, 3, 8)
    l0, l1 = enc.mlp.layers
    for b, n in enumerate([3, 2]):
        for k in range(n):
            v = x[b, k]
            hidden = F.linear(v, l0.weight, l0.bias)
            hidden = (hidden - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            expected = F.linear(v, enc.fc.weight, enc.fc.bias) + F.linear(hidden.clamp(min=0), l1.weight, l1.bias)
            assert torch.allclose(out[b, k], expected, atol=1e-5)
    assert torch.equal(out[1, 2], torch.zeros(8))  # zero beyond lengths


def test_unused_last_batchnorm_does_not_affect_output():
    torch.manual_seed(2)
    enc = PrecompRegionEncoder(12, 8).eval()
    x, lengths = regions([3, 3])
    before = enc(x, lengths)
    with torch.no_grad():
        enc.mlp.bns[1].weight.fill_(5.0), enc.mlp.bns[1].running_mean.fill_(3.0)
    assert torch.equal(before, enc(x, lengths))


def test_padding_invariance_in_eval_and_batch_dependence_in_train():
    torch.manual_seed(3)
    enc = PrecompRegionEncoder(12, 8).eval()
    x, lengths = regions([4, 2, 3])
    wide, _ = regions([4, 2, 3], k=7, fill=5.0)
    assert torch.allclose(enc(x, lengths), enc(wide, lengths)[:, :4], atol=1e-6)
    enc.train()  # BN statistics include padded rows (reference quirk, baselines.md §F.3)
    assert not torch.allclose(enc(x, lengths), enc(wide, lengths)[:, :4], atol=1e-4)


def test_scan_style_fc_only_with_l2_regions():
    torch.manual_seed(4)
    enc = PrecompRegionEncoder(12, 8, mlp_residual=False, l2_regions=True)
    assert enc.mlp is None and set(enc.state_dict()) == {"fc.weight", "fc.bias"}
    x, lengths = regions([3, 1])
    out = enc(x, lengths)
    raw = F.linear(x, enc.fc.weight, enc.fc.bias)
    assert torch.allclose(out[0], raw[0] / (raw[0].norm(dim=-1, keepdim=True) + 1e-8), atol=1e-6)
    assert torch.allclose(out[0].norm(dim=-1), torch.ones(3), atol=1e-5)
    kept = PrecompRegionEncoder(12, 8, mlp_residual=False, zero_padding=False)
    kept.load_state_dict(enc.state_dict())
    assert torch.allclose(kept(x, lengths)[1, 1], enc.fc.bias)  # padded row = fc(0) when not zeroed


def test_wrong_feature_size_names_the_config_field():
    enc = PrecompRegionEncoder(12, 8)
    with pytest.raises(ValueError, match=r"expected \[B, K, 12\] \(img_dim.*found shape \(2, 3, 10\)"):
        enc(torch.zeros(2, 3, 10), torch.tensor([3, 3]))


def test_mlp_batchnorm_runs_over_all_rows():
    torch.manual_seed(5)
    mlp = MLP(6, 4, 3, 2).train()
    x = torch.randn(2, 5, 6)
    out = mlp(x)
    rows = mlp(x.reshape(10, 6))
    assert out.shape == (2, 5, 3) and torch.allclose(out.reshape(10, 3), rows, atol=1e-6)
    assert int(mlp.bns[0].num_batches_tracked) == 2 and int(mlp.bns[1].num_batches_tracked) == 0
