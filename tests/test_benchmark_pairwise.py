"""benchmarks/pairwise_engine.py: its reference loops agree with the engine, its FLOP counts are right.

The benchmark's speed figures are measured by running it (README, docs/scan.md, docs/sgraf.md,
docs/lhsc.md); here it runs at toy sizes so that the loops written in it (SCAN's
``xattn_score_*``, SGRAF's ``EncoderSimilarity.forward`` structure, LHSC's encoders) are proven
equal to the engine they are timed against.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "pairwise_engine.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pairwise_engine_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_reference_loops_equal_the_engine_at_toy_sizes(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--images", "6", "--captions", "24", "--dim", "32", "--loop-captions", "8",
            "--sgraf-loop-captions", "8", "--methods", "scan-t2i,scan-i2t,sgraf", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"scan-t2i", "scan-i2t", "sgr", "saf"}
    for name, row in rows.items():
        assert row["max_abs_diff"] < 1e-5, name
        assert row["loop_extrapolated"] and row["loop_captions"] == 8
        assert row["speedup_bound"] == pytest.approx(row["loop_seconds_full"] / row["floor_seconds"])
        assert 0 < row["gemm_share"] <= 1 and row["gemm_gflops"] > 0, name  # the profiled sample ran
    # SGR's engine skips a third of the graph arithmetic; SAF does the same arithmetic as the loop
    assert 0 < rows["sgr"]["engine_tflop"] < rows["sgr"]["loop_tflop_full"]
    assert rows["saf"]["engine_tflop"] == pytest.approx(rows["saf"]["loop_tflop_full"])
    printed = capsys.readouterr().out
    assert "floor s" in printed and "GEMM rate" in printed


def test_gemm_breakdown_counts_gemms_and_only_gemms(bench):
    a, b = torch.randn(256, 512), torch.randn(512, 384)
    share, rate = bench.gemm_breakdown(lambda: [a @ b for _ in range(5)])
    assert share > 0.9 and rate > 0.1  # GFLOP/s from the profiler's FLOP count: 2 x 256 x 512 x 384 per call
    share, _ = bench.gemm_breakdown(lambda: [a.exp() for _ in range(5)])
    assert share == 0


@pytest.mark.parametrize("sample_images", [50, 0])
def test_lhsc_loop_with_its_encoders_equals_the_engine_at_toy_sizes(bench, tmp_path, sample_images):
    """LHSC's row encodes raw features and word ids on both sides; 130 captions make two of the
    reference's 100-caption encoding batches, and the loop's 105 captions reach into the second.
    Its GEMM breakdown profiles the pairwise part on the encodings; ``--sample-images 0`` skips it."""
    out = tmp_path / "rows.json"
    argv = ["--images", "5", "--captions", "130", "--dim", "16", "--sgraf-loop-captions", "105",
            "--methods", "lhsc", "--lhsc-img-dim", "12", "--lhsc-word-dim", "8", "--json", str(out),
            "--sample-images", str(sample_images)]
    assert bench.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["method"] == "lhsc" and row["n_captions"] == 130 and row["loop_captions"] == 105
    assert row["max_abs_diff"] < 1e-5
    assert row["engine_tflop"] == pytest.approx(row["loop_tflop_full"])  # same arithmetic on both sides
    assert (row["gemm_share"] is None) == (sample_images == 0)


def test_lhsc_flop_count_by_hand(bench):
    # n_img 1, R 2, d 4, s 2, word dim 3, img_dim 5, one block of each kind; captions L = 2, 3
    # per caption: SAF 136 / 192 (as SGRAF's), TextSA 2Ld² + 2d² + 2Ld = 112 / 152, GRU 12 L d (e + d)
    # = 672 / 1008, the word block on the batch's padded length 3: 6*3*9 + 4*9*3 = 270 for both
    per, eng, fixed = bench.lhsc_flops(np.array([2, 3]), 1, R=2, d=4, s=2, e=3, img_dim=5, blocks=1, batch=2)
    assert per.tolist() == [136 + 112 + 270 + 672, 192 + 152 + 270 + 1008] and eng.tolist() == per.tolist()
    # fixed: fc 2*2*5*4 = 80, region block 12*2*16 + 4*4*4 = 448, VisualSA 2*2*16 + 2*16 + 2*2*4 = 112
    assert fixed == 80 + 448 + 112
    # batches of one caption: the first caption's word block runs on its own 2 positions
    per, _, _ = bench.lhsc_flops(np.array([2, 3]), 1, R=2, d=4, s=2, e=3, img_dim=5, blocks=1, batch=1)
    assert per[0] == 136 + 112 + (6 * 2 * 9 + 4 * 4 * 3) + 672


def test_cefg_loop_equals_the_engine_at_toy_sizes(bench, tmp_path):
    out = tmp_path / "rows.json"
    argv = ["--images", "5", "--captions", "12", "--dim", "32", "--regions", "6", "--cefg-captions", "12",
            "--cefg-loop-captions", "6", "--methods", "cefg", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"cefg-sgr", "cefg-saf"}
    for name, row in rows.items():
        assert row["max_abs_diff"] < 1e-5, name
        assert row["loop_extrapolated"] and row["loop_captions"] == 6
        # the engine skips the last round's modulation MLP (and SGR's graph work): less arithmetic
        assert 0 < row["engine_tflop"] < row["loop_tflop_full"]
        assert row["speedup_bound"] == pytest.approx(row["loop_seconds_full"] / row["floor_seconds"])


def test_cefg_flop_count_by_hand(bench):
    # SAF, one image, L = 2 words, R2 = 2 enhanced regions, d = 4, s = 2, 3 rounds:
    # SGRAF's SAF count 136 (test below); per round attention 4*2*2*4 = 64, local 2*2*4*2 = 32,
    # temperature MLP 2*2*(2*1 + 1) = 12 -> 108; modulation L*d = 8 and its MLP 2*2*(2*4 + 4*4) = 96
    ref, eng = bench.cefg_flops("SAF", np.array([2]), 1, R2=2, d=4, s=2, sgr_steps=3, rounds=3)
    assert ref.tolist() == [136 + 3 * (108 + 8 + 96)]
    assert eng.tolist() == [136 + 3 * 108 + 2 * (8 + 96)]


def test_sgraf_flop_count_by_hand(bench):
    # one image, one caption of L = 2 words (P = 3 nodes), R = 2, d = 4, s = 2, 3 SGR steps:
    # common = attention 4*2*2*4 + local 2*2*4*2 + global 2*4*2 = 64 + 32 + 16 = 112
    # reference SGR: 3 * (3 * 2*3*2*2 + 2 * 2*9*2) = 3 * (72 + 72) = 432
    # engine: 2 full steps * (2*3*(2*2)*2 + 2 * 2*9*2) + read-out step (2*2*2*2 + 2*2*3*2) = 240 + 40
    ref, eng = bench.sgraf_flops("SGR", np.array([2]), 1, R=2, d=4, s=2, steps=3)
    assert ref.tolist() == [112 + 432] and eng.tolist() == [112 + 280]
    # SAF: gates (2 P s) and the weighted sum (2 P s), both sides
    ref, eng = bench.sgraf_flops("SAF", np.array([2, 5]), 3, R=2, d=4, s=2, steps=3)
    expected = [3 * (112 + 24), 3 * (4 * 2 * 5 * 4 + 2 * 5 * 4 * 2 + 16 + 48)]
    assert ref.tolist() == expected and eng.tolist() == expected


def test_scan_flop_count_by_hand(bench):
    # t2i, L = 3 words, R = 2 regions, d = 4: loop 4*2*3*4 + 4*3*4 = 96 + 48; engine 2*2*3*4 + 2*2*2*3
    ref, eng = bench.scan_flops("t2i", np.array([3]), 1, R=2, d=4)
    assert ref.tolist() == [144] and eng.tolist() == [48 + 24]
    # i2t: queries are the 2 regions, context the 3 words
    ref, eng = bench.scan_flops("i2t", np.array([3]), 2, R=2, d=4)
    assert ref.tolist() == [2 * (96 + 32)] and eng.tolist() == [2 * (48 + 36)]
