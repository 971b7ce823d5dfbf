"""Benchmark: the pairwise similarity engine against the reference-style loop (scan.md §4).

Flickr30K test shapes: 1000 images x 36 regions x 1024 dims, 5000 captions whose lengths come
from ``f30k_precomp/test_caps.txt`` tokenised as SCAN does (+2 for ``<start>``/``<end>``), random
unit vectors. In one run, on the same inputs, it times

(a) the straightforward reference-style loop (``xattn_score_t2i``: one caption at a time against
    all images, materialising the ``[n_img, L, d]`` attended vectors; fp32), and
(b) :func:`itmkit.similarity.engine.pairwise_similarity` on the full matrix,

for SCAN t2i (and i2t), SGRAF's two models SGR and SAF, LHSC (whose row includes its
encoders: raw 2048-d features and word ids in, see :func:`reference_loop_lhsc`) and CEFG's two
(``cefg-sgr``, ``cefg-saf``: SGRAF plus the correspondence regulator over 2R context-enhanced
regions), and prints times, ratio, peak memory of
each, the max abs difference, and the arithmetic: FLOPs of the loop and of the engine, the
machine's measured GEMM rate, and the fastest the engine's arithmetic could possibly run at that
rate (``floor s``) with the speed-up that would give (``bound``). The full SCAN loop takes ~11 min
on a 2-core CPU, SGR's ~40: ``--loop-captions N`` / ``--sgraf-loop-captions N`` time the loops on
the first N captions and extrapolate (the output says so).

    python benchmarks/pairwise_engine.py              # f30k shapes, loop on 500 captions
    python benchmarks/pairwise_engine.py --quick      # 100 x 500, a few seconds
    python benchmarks/pairwise_engine.py --loop-captions 5000   # the whole loop (~11 min)
    python benchmarks/pairwise_engine.py --methods sgr,saf --sgraf-captions 5000   # full SGRAF
    python benchmarks/pairwise_engine.py --methods lhsc --sgraf-captions 5000       # full LHSC
    python benchmarks/pairwise_engine.py --methods cefg --cefg-captions 5000        # full CEFG (hours on a CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from itmkit.config import TextConfig
from itmkit.encoded import Encoded, EncodedWriter
from itmkit.methods.scan import SCAN, SCANConfig
from itmkit.paths import scan_text_dir
from itmkit.runtime import seed_everything
from itmkit.similarity.engine import pairwise_similarity


# --------------------------------------------------------------------------- memory accounting
def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory during a ``with`` block: absolute and above the RSS at its start."""

    def __enter__(self) -> "PeakMemory":
        self.supported = reset_peak_rss()
        self.start_kib = _rss_kib("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        peak = _rss_kib("VmHWM") if self.supported else None
        self.peak_gib = None if peak is None else peak / 2**20
        self.extra_gib = None if peak is None else (peak - self.start_kib) / 2**20


# --------------------------------------------------------------------------- inputs
def caption_lengths(n_cap: int, generator: np.random.Generator) -> tuple[np.ndarray, str]:
    """Token counts of the real f30k test captions (+2), or a stand-in when the file is absent."""
    path = scan_text_dir() / "f30k_precomp" / "test_caps.txt"
    if path.is_file():
        from itmkit.data.tokenize import word_tokenize

        caps = path.read_text(encoding="utf-8").splitlines()
        lengths = np.array([len(word_tokenize(c.strip())) + 2 for c in caps if c.strip()])
        source = f"{path} ({len(lengths)} captions, mean length {lengths.mean():.2f})"
    else:  # keeps the benchmark runnable on a clone without the shared files
        lengths = np.clip(np.round(generator.lognormal(2.7, 0.3, 5000)), 4, 80).astype(int)
        source = "synthetic log-normal lengths (test_caps.txt not found)"
    reps = math.ceil(n_cap / len(lengths))
    return np.tile(lengths, reps)[:n_cap], source


def unit_sets(n: int, lengths: np.ndarray, d: int, generator: torch.Generator) -> Encoded:
    """``[n, max(lengths), d]`` random unit vectors, zero beyond each length."""
    lengths_t = torch.as_tensor(lengths, dtype=torch.long)
    t_max = int(lengths_t.max())
    feats = torch.randn(n, t_max, d, generator=generator)
    feats = F.normalize(feats, dim=-1)
    feats *= (torch.arange(t_max)[None] < lengths_t[:, None])[..., None]
    return Encoded(feats, lengths_t)


# --------------------------------------------------------------------------- reference loops
def l2n(x: torch.Tensor) -> torch.Tensor:
    """The references' ``l2norm``: ``x / (||x|| + 1e-8)`` over the last axis."""
    return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


def reference_loop_scan(images: Encoded, captions: Encoded, cfg: SCANConfig, n_captions: int) -> torch.Tensor:
    """SCAN's ``xattn_score_t2i`` / ``xattn_score_i2t`` as the reference writes them: for each
    caption, repeat it for every image, run ``func_attention`` (``[n_img, R, L]`` attention and
    ``[n_img, L, d]`` attended vectors), cosine, pool. fp32, no masks (all 36 regions real)."""
    img = images.feats
    n_img = img.shape[0]
    out = torch.empty(n_img, n_captions)
    for j in tqdm(range(n_captions), desc="reference loop", unit="caption", leave=False):
        words = captions.feats[j, : int(captions.lengths[j])]
        cap = words.unsqueeze(0).repeat(n_img, 1, 1)  # [n_img, L, d]
        if cfg.cross_attn == "t2i":
            query, context = cap, img
        else:
            query, context = img, cap
        attn = torch.bmm(context, query.transpose(1, 2))  # [n, Lc, Lq]
        attn = F.leaky_relu(attn, 0.1)
        attn = attn / (attn.norm(dim=2, keepdim=True) + 1e-8)  # clipped_l2norm over the query items
        attn = torch.softmax(attn * cfg.lambda_softmax, dim=1)  # over the context items
        attended = torch.bmm(attn.transpose(1, 2), context)  # [n, Lq, d]
        w12 = (query * attended).sum(2)
        rel = w12 / (query.norm(dim=2) * attended.norm(dim=2)).clamp(min=1e-8)
        if cfg.agg_func == "LogSumExp":
            out[:, j] = torch.log(torch.exp(rel * cfg.lambda_lse).sum(1)) / cfg.lambda_lse
        else:
            out[:, j] = rel.mean(1)
    return out


def reference_loop_sgraf(model, images: Encoded, captions: Encoded, n_captions: int) -> torch.Tensor:
    """SGRAF's ``EncoderSimilarity.forward`` as the reference writes it (sgraf.md §3.3, eval mode):
    for each caption, slice its valid words, repeat them for every image, SCAN t2i attention with
    λ = 9 and the attended vectors l2-normalised, the ``[n_img, L_j + 1, s]`` similarity graph,
    then SGR (every step on every node, three ``s x s`` linears each) or SAF. The global vectors
    (VisualSA / TextSA) are the precomputed ``extras["global"]`` of both inputs, as for the
    engine. Independent of :mod:`itmkit.models.sgraf_modules` apart from the weights."""
    sim = model.sim
    img, img_glo = images.feats, images.extras["global"]
    n_img = img.shape[0]
    out = torch.empty(n_img, n_captions)
    for j in tqdm(range(n_captions), desc="reference loop", unit="caption", leave=False):
        cap = captions.feats[j, : int(captions.lengths[j])].unsqueeze(0).repeat(n_img, 1, 1)  # [n, L, d]
        attn = F.leaky_relu(torch.bmm(img, cap.transpose(1, 2)), 0.1)  # [n, R, L]
        attn = attn / (attn.norm(dim=2, keepdim=True) + 1e-8)
        attn = torch.softmax(attn.transpose(1, 2) * 9.0, dim=2)  # [n, L, R]
        ctx = l2n(torch.bmm(attn, img))  # [n, L, d]
        sim_loc = l2n(sim.sim_tranloc_w((ctx - cap) ** 2))
        out[:, j] = _reference_readout(sim, img_glo, captions.extras["global"][j], sim_loc)
    return out


def _reference_readout(sim, img_glo, cap_glo, sim_loc) -> torch.Tensor:
    """SGRAF's tail for one caption against all images (sgraf.md §3.3 d-f): the global node, the
    ``[n_img, L_j + 1, s]`` graph, SGR (every step on every node, three linears) or SAF, the score."""

    def l2n(x):
        return x / (x.norm(dim=-1, keepdim=True) + 1e-8)

    sim_glo = l2n(sim.sim_tranglo_w((img_glo - cap_glo) ** 2))
    x = torch.cat([sim_glo[:, None], sim_loc], 1)  # [n, L + 1, s]
    if sim.module_name == "SGR":
        for step in sim.SGR_module:
            edges = torch.softmax(torch.bmm(step.graph_query_w(x), step.graph_key_w(x).transpose(1, 2)), -1)
            x = torch.relu(step.sim_graph_w(torch.bmm(edges, x)))
        v = x[:, 0]
    else:
        saf, bn = sim.SAF_module, sim.SAF_module.bn
        a = saf.attn_sim_w(x)[..., 0]
        a = torch.sigmoid((a - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
        a = a / (a.abs().sum(1, keepdim=True) + 1e-8)
        v = l2n((a[..., None] * x).sum(1))
    return torch.sigmoid(sim.sim_eval_w(v))[:, 0]


def reference_loop_cefg(model, images: Encoded, captions: Encoded, n_captions: int) -> torch.Tensor:
    """CEFG's ``EncoderSimilarity.forward`` caption loop as the reference writes it (cefg.md §3.3
    e-h, eval mode): for each caption, its valid words repeated for every image; three regulator
    rounds, each a ``SCAN_attention`` of the modulated words over the ``2R`` enhanced regions with
    the current temperature (a number, then ``[n_img, L, 1]``), the local similarity vectors and
    both regulator MLPs (the last round's modulation too, which the reference computes and drops);
    the final attention with the plain words; then SGRAF's tail. The enhanced regions and the
    global vectors are the precomputed ``Encoded`` inputs, as for the engine."""
    sim = model.sim
    img, img_glo = images.feats, images.extras["global"]
    n_img = img.shape[0]

    def l2n(x):
        return x / (x.norm(dim=-1, keepdim=True) + 1e-8)

    def scan_attention(query, smooth):
        attn = F.leaky_relu(torch.bmm(img, query.transpose(1, 2)), 0.1)  # [n, 2R, L]
        attn = attn / (attn.norm(dim=2, keepdim=True) + 1e-8)
        attn = torch.softmax(attn.transpose(1, 2) * smooth, dim=2)  # [n, L, 2R]
        return l2n(torch.bmm(attn, img))

    out = torch.empty(n_img, n_captions)
    for j in tqdm(range(n_captions), desc="reference loop", unit="caption", leave=False):
        cap = captions.feats[j, : int(captions.lengths[j])].unsqueeze(0).repeat(n_img, 1, 1)  # [n, L, d]
        matrix, smooth = torch.ones(cap.shape[-1]), 10.0
        for regulator in sim.rcr_modules:
            ctx = scan_attention(cap * matrix, smooth)
            sim_loc = l2n(sim.sim_tranloc_w((ctx - cap) ** 2))
            matrix = (torch.tanh(regulator.rcr_matrix_w(sim_loc)) + matrix).clamp(-1, 1)
            smooth = torch.relu(regulator.rcr_smooth_w(sim_loc) + smooth)
        ctx = scan_attention(cap, smooth)
        sim_loc = l2n(sim.sim_tranloc_w((ctx - cap) ** 2))
        out[:, j] = _reference_readout(sim, img_glo, captions.extras["global"][j], sim_loc)
    return out


def reference_lhsc_images(model, feats: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """LHSC's ``EncoderImage.forward`` as the reference writes it (lhsc.md §3.1), in batches of
    ``batch`` images as its ``encode_data``: ``fc``, then four ``IM_GCN`` blocks in the
    channels-first layout with kernel-1 ``conv1d`` (the four θ / φ convs run separately and are
    concatenated), eval-mode BatchNorm, l2 norm. ``feats [n, R, img_dim]`` -> ``[n, R, d]``."""
    fc = model.image.fc
    out = []
    for start in range(0, len(feats), batch):
        x = fc(feats[start : start + batch]).permute(0, 2, 1)  # [B, d, R]
        for block in model.image.graph.blocks:
            d = x.shape[1]

            def conv(layer, v, rows=slice(None)):
                return F.conv1d(v, layer.weight[rows, :, None], layer.bias[rows])

            quarters = [slice(k * d // 4, (k + 1) * d // 4) for k in range(4)]
            theta = torch.cat([conv(block.theta, x, q) for q in quarters], 1).permute(0, 2, 1)
            phi = torch.cat([conv(block.phi, x, q) for q in quarters], 1).permute(0, 2, 1)
            f = block.fc1(theta) @ block.fc2(phi).transpose(1, 2) / x.shape[-1]  # [B, R, R]
            y = (f @ conv(block.g, x).permute(0, 2, 1)).permute(0, 2, 1)  # [B, d, R]
            x = x + block.bn(conv(block.W, y))
        out.append(l2n(x.permute(0, 2, 1)))
    return torch.cat(out)


def reference_lhsc_captions(
    model, tokens: torch.Tensor, lengths: torch.Tensor, n_captions: int, batch: int = 100
) -> torch.Tensor:
    """LHSC's ``EncoderText.forward`` as the reference writes it (lhsc.md §3.2) for the first
    ``n_captions`` captions: batches of ``batch`` consecutive captions, each padded with id 0 to
    the longest caption of the **whole** batch (the padding changes the encoding, §8.2);
    embedding, four ``TextAttn`` blocks over the padded batch (pads are keys, divided by the padded
    length), packed bi-GRU (sorted by length), mean of the directions, l2 norm. Returns ``[n, L, d]``
    (zero beyond each caption)."""
    text = model.text
    d = text.embed_size
    out = torch.zeros(n_captions, tokens.shape[1], d)
    for start in range(0, n_captions, batch):
        L = int(lengths[start : start + batch].max())
        stop = min(start + batch, n_captions)
        lens = lengths[start:stop]
        x = text.embed(tokens[start:stop, :L])
        for block in text.word_layers.blocks:
            local = torch.tanh(block.embedding_local(x))
            glob = torch.tanh(block.embedding_global(x))
            x = x + (local @ glob.transpose(1, 2) / L) @ torch.tanh(block.embedding_v(x))
        order = torch.argsort(lens, descending=True)  # the reference's collate sorts by length
        packed = torch.nn.utils.rnn.pack_padded_sequence(x[order], lens[order], batch_first=True)
        rnn, _ = torch.nn.utils.rnn.pad_packed_sequence(text.rnn(packed)[0], batch_first=True, total_length=L)
        words = l2n((rnn[..., :d] + rnn[..., d:]) / 2)
        out[start + order, :L] = words
    return out


def reference_loop_lhsc(model, raw_images, tokens, lengths, n_captions: int) -> tuple[torch.Tensor, float]:
    """LHSC's evaluation as the reference runs it (lhsc.md §4): encode every image
    (:func:`reference_lhsc_images`) and the first ``n_captions`` captions
    (:func:`reference_lhsc_captions`, batches of 100), then the per-caption SAF loop
    (:func:`reference_loop_sgraf`; the VisualSA / TextSA global vectors come from the model's own
    modules, as for the engine). Returns ``(scores [n_img, n_captions], seconds of the image
    encoding)``: that part does not grow with the captions, so it is not extrapolated."""
    start = time.perf_counter()
    regions = reference_lhsc_images(model, raw_images.feats)
    image_seconds = time.perf_counter() - start
    images = Encoded(regions, raw_images.lengths, {"global": model.sim.global_image(regions)})
    words = reference_lhsc_captions(model, tokens, lengths, n_captions)
    captions = Encoded(words, lengths[:n_captions])
    captions.extras["global"] = model.sim.global_caption(words, captions.mask)
    return reference_loop_sgraf(model, images, captions, n_captions), image_seconds


def sgraf_flops(module: str, lengths: np.ndarray, n_img: int, R: int, d: int, s: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs per caption column (``[n_cap]`` each, all images): ``(reference loop, engine)``.

    Both: attention ``4 R L d``, local projection ``2 L d s``, global node ``2 d s``. SGR, per
    step on ``P = L + 1`` nodes: the reference ``3 · 2 P s²`` (three linears) + ``2 · 2 P² s``
    (edges, messages); the engine ``2 P (2s) s`` (one fused ``[s, 2s]`` GEMM) + ``2 · 2 P² s``
    for every step but the last, which updates the read-out node only (``2 · 2 s² + 2 · 2 P s``).
    """
    L = lengths.astype(np.float64)
    P = L + 1
    common = 4 * R * L * d + 2 * L * d * s + 2 * d * s
    if module == "SGR":
        ref = common + steps * (3 * 2 * P * s * s + 2 * 2 * P * P * s)
        eng = common + (steps - 1) * (2 * P * 2 * s * s + 2 * 2 * P * P * s) + (2 * 2 * s * s + 2 * 2 * P * s)
    else:  # SAF: gates and the weighted sum
        ref = eng = common + 2 * P * s * 2
    return ref * n_img, eng * n_img


def lhsc_flops(
    lengths: np.ndarray, n_img: int, R: int, d: int, s: int, e: int, img_dim: int, blocks: int = 4, batch: int = 100,
) -> tuple[np.ndarray, np.ndarray, float]:
    """LHSC's FLOPs (both sides do the same arithmetic): ``(per caption column [n_cap], the same,
    fixed)``. Per caption: SAF's pairwise part (:func:`sgraf_flops`), TextSA ``2 L d² + 2 d² + 2 L d``,
    the word blocks on the padded length ``L_b`` of the caption's batch of ``batch`` consecutive
    captions ``blocks · (6 L_b e² + 4 L_b² e)``, the bi-GRU ``2 · L · 6 d (e + d)``. Fixed (every
    image once): ``fc`` ``2 R img_dim d``, the region blocks ``blocks · (12 R d² + 4 R² d)``,
    VisualSA ``2 R d² + 2 d² + 2 R d``."""
    L = lengths.astype(np.float64)
    padded = np.concatenate([np.full(len(L[i : i + batch]), L[i : i + batch].max()) for i in range(0, len(L), batch)])
    per_caption = (
        sgraf_flops("SAF", lengths, n_img, R, d, s, 0)[0]
        + 2 * L * d * d + 2 * d * d + 2 * L * d
        + blocks * (6 * padded * e * e + 4 * padded * padded * e)
        + 2 * L * 6 * d * (e + d)
    )  # fmt: skip
    fixed = n_img * (2 * R * img_dim * d + blocks * (12 * R * d * d + 4 * R * R * d) + 2 * R * d * d + 2 * d * d + 2 * R * d)
    return per_caption, per_caption.copy(), float(fixed)


def cefg_flops(
    module: str, lengths: np.ndarray, n_img: int, R2: int, d: int, s: int, sgr_steps: int, rounds: int
) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs per caption column: ``(reference loop, engine)``, over ``R2 = 2R`` enhanced regions.

    SGRAF's count (:func:`sgraf_flops`: the final attention, local projection, global node,
    graph) plus, per regulator round, another attention ``4 R2 L d`` and local projection
    ``2 L d s``, the query modulation ``L d``, the temperature MLP ``2 L (s · s/2 + s/2)`` and the
    modulation MLP ``2 L (s · 2s + 2s · d)``. The engine skips the first round's modulation (it is
    1) and the last round's modulation MLP (its output is discarded, cefg.md §8.7)."""
    L = lengths.astype(np.float64)
    ref_tail, eng_tail = sgraf_flops(module, lengths, 1, R2, d, s, sgr_steps)
    per_round = 4 * R2 * L * d + 2 * L * d * s + 2 * L * (s * (s // 2) + s // 2)
    modulation_mlp = 2 * L * (s * 2 * s + 2 * s * d)
    ref = ref_tail + rounds * (per_round + L * d + modulation_mlp)
    eng = eng_tail + rounds * per_round + (rounds - 1) * (L * d + modulation_mlp)
    return ref * n_img, eng * n_img


def scan_flops(direction: str, lengths: np.ndarray, n_img: int, R: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs per caption column: ``(reference loop, engine)``. The loop: scores ``2 R L d``, the
    attended vectors ``2 R L d``, cosines ``4 Q d`` (``Q`` queries: words for t2i, regions for
    i2t). The engine takes the cosines from the scores and a Gram matrix of the context items
    (scan.md §3.5): ``2 R L d`` plus ``2 C² Q`` (``C`` context items)."""
    L = lengths.astype(np.float64)
    queries, context = (L, R) if direction == "t2i" else (R, L)
    ref = 4 * R * L * d + 4 * queries * d
    eng = 2 * R * L * d + 2 * context * context * queries
    return ref * n_img, eng * n_img


def measure_gemm_gflops(d: int, s: int, seconds: float = 1.5) -> float:
    """The machine's fp32 GEMM rate on the engine's dominant shape ``[8192, d] x [d, s]``
    (best of repeated runs), the yardstick for the arithmetic floor."""
    a, b = torch.randn(8192, d), torch.randn(d, s)
    a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 8192 * d * s / (time.perf_counter() - t) / 1e9)
    return best


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemm_breakdown(fn) -> tuple[float, float]:
    """Run ``fn()`` under the profiler: ``(share of its operator time spent in GEMMs, the GFLOP/s
    those GEMMs ran at)``. Where the engine's time goes beyond its floor: slow GEMM shapes (the
    ``K = R`` attended products, small blocks) or the per-pair elementwise work around them."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = [e for e in events if e.key in GEMM_OPS]
    gemm_us = sum(e.self_cpu_time_total for e in gemm)
    gemm_flops = sum(e.flops for e in gemm)
    return gemm_us / max(total, 1), gemm_flops / max(gemm_us, 1) / 1e3


# --------------------------------------------------------------------------- one comparison
@dataclass
class Row:
    method: str
    n_images: int
    n_captions: int
    loop_captions: int
    loop_seconds_measured: float
    loop_seconds_full: float
    loop_extrapolated: bool
    engine_seconds: float
    speedup: float
    loop_peak_gib: float | None
    loop_extra_gib: float | None
    engine_peak_gib: float | None
    engine_extra_gib: float | None
    engine_gflops: float
    max_abs_diff: float
    loop_gflops: float
    loop_tflop_full: float
    engine_tflop: float
    gemm_peak_gflops: float
    floor_seconds: float
    speedup_bound: float
    gemm_share: float | None = None
    gemm_gflops: float | None = None

    @property
    def over_floor(self) -> float:
        return self.engine_seconds / self.floor_seconds


def compare(
    name, model, images, captions, loop_fn, loop_captions, budget, flops, gemm_peak, engine_fn=None, fixed_flops=0.0,
    sample_fn=None, sample_images: int = 50,
) -> Row:
    """Time ``loop_fn(loop_captions)`` and the engine on the same inputs. ``flops = (loop, engine)``:
    FLOPs per caption column (``[n_cap]`` arrays).

    ``loop_fn`` returns the scores of the first ``loop_captions`` captions, or ``(scores,
    fixed_seconds)`` where ``fixed_seconds`` of its time do not grow with the captions (LHSC's
    image encoder) and are not extrapolated. ``engine_fn()`` (default: the engine on ``images``,
    ``captions``) returns the full matrix. ``fixed_flops``: arithmetic outside the caption columns,
    done by both sides. ``sample_fn()`` (default: the engine on the first ``sample_images`` images)
    runs once more under the profiler for :func:`gemm_breakdown`; ``sample_images=0`` skips it."""
    n_cap = len(captions)
    loop_captions = min(loop_captions, n_cap)
    loop_flops, engine_flops = (np.asarray(f, dtype=np.float64) for f in flops)
    default_engine = engine_fn is None
    if default_engine:
        engine_fn = lambda: pairwise_similarity(model, images, captions, memory_budget=budget, progress=True, desc=name)  # noqa: E731
    # the engine first: its peak is then the inputs and the engine, not what the loop's
    # allocations left resident (the allocator keeps freed memory)
    with torch.no_grad():
        with PeakMemory() as engine_mem:
            start = time.perf_counter()
            sims = engine_fn()
            engine_time = time.perf_counter() - start
        with PeakMemory() as loop_mem:
            start = time.perf_counter()
            loop = loop_fn(loop_captions)
            loop_time = time.perf_counter() - start
    if sample_fn is None and default_engine and sample_images > 0:  # a custom engine_fn brings its own sample
        sample = images.slice(0, min(sample_images, len(images)))
        sample_fn = lambda: pairwise_similarity(model, sample, captions, memory_budget=budget)  # noqa: E731
    gemm_share, gemm_gflops = gemm_breakdown(sample_fn) if sample_fn is not None else (None, None)
    loop, fixed_time = loop if isinstance(loop, tuple) else (loop, 0.0)
    # the loop's full time scales with its arithmetic (captions differ in length)
    full_loop = fixed_time + (loop_time - fixed_time) * loop_flops.sum() / loop_flops[:loop_captions].sum()
    engine_total = engine_flops.sum() + fixed_flops
    floor = engine_total / (gemm_peak * 1e9)
    diff = float((sims[:, :loop_captions] - loop).abs().max())
    return Row(
        name, len(images), n_cap, loop_captions, loop_time, full_loop, loop_captions < n_cap, engine_time,
        full_loop / engine_time, loop_mem.peak_gib, loop_mem.extra_gib, engine_mem.peak_gib,
        engine_mem.extra_gib, engine_total / engine_time / 1e9, diff,
        (loop_flops[:loop_captions].sum() + fixed_flops) / loop_time / 1e9, (loop_flops.sum() + fixed_flops) / 1e12,
        engine_total / 1e12, gemm_peak, floor, full_loop / floor, gemm_share, gemm_gflops,
    )  # fmt: skip


def with_gemm_peak(row: Row, gemm_peak: float) -> Row:
    """``row`` with its floor and bound recomputed for the GEMM rate ``gemm_peak`` (GFLOP/s)."""
    floor = row.engine_tflop * 1e12 / (gemm_peak * 1e9)
    return replace(row, gemm_peak_gflops=gemm_peak, floor_seconds=floor, speedup_bound=row.loop_seconds_full / floor)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(rows: list[Row], notes: list[str]) -> str:
    lines = [*notes, ""]
    header = (
        f"{'method':<12} {'matrix':>11} {'loop s':>9} {'engine s':>9} {'speedup':>8} "
        f"{'loop GiB':>9} {'eng GiB':>8} {'eng +GiB':>8} {'max|diff|':>10} {'loop TF':>8} {'eng TF':>7} "
        f"{'loop GF/s':>9} {'eng GF/s':>8} {'floor s':>8} {'bound':>6} {'x floor':>7} {'gemm %':>6} {'gemm GF/s':>9}"
    )
    lines += [header, "-" * len(header)]
    for r in rows:
        loop = f"{r.loop_seconds_full:.1f}{'*' if r.loop_extrapolated else ''}"
        lines.append(
            f"{r.method:<12} {f'{r.n_images}x{r.n_captions}':>11} {loop:>9} {r.engine_seconds:>9.1f} "
            f"{r.speedup:>7.1f}x {_fmt(r.loop_peak_gib, '.2f'):>9} {_fmt(r.engine_peak_gib, '.2f'):>8} "
            f"{_fmt(r.engine_extra_gib, '.2f'):>8} {r.max_abs_diff:>10.2e} {r.loop_tflop_full:>8.2f} "
            f"{r.engine_tflop:>7.2f} {r.loop_gflops:>9.1f} {r.engine_gflops:>8.1f} {r.floor_seconds:>8.1f} "
            f"{r.speedup_bound:>5.1f}x {r.over_floor:>6.2f}x "
            f"{_fmt(None if r.gemm_share is None else 100 * r.gemm_share, '.0f'):>6} {_fmt(r.gemm_gflops, '.0f'):>9}"
        )
    if any(r.loop_extrapolated for r in rows):
        lines.append(
            "* loop time extrapolated from the first --loop-captions captions (measured: "
            + ", ".join(f"{r.method} {r.loop_seconds_measured:.1f} s on {r.loop_captions}" for r in rows)
            + "); the difference is over those captions"
        )
    lines.append(
        "GiB: peak resident memory of the process during the phase (inputs included; the engine runs "
        "first, the loop after it); eng +GiB: above the RSS at the start of the engine phase. TF: TFLOP of the full matrix (loop: the reference's "
        "arithmetic; eng: the engine's, which skips work the loop does, see sgraf_flops / scan_flops). "
        f"floor s: the engine's TFLOP at the measured GEMM rate ({rows[0].gemm_peak_gflops:.0f} GFLOP/s), "
        "the fastest it could run; bound: loop time / floor s, the largest speed-up that arithmetic allows. "
        "x floor: engine s / floor s. gemm %, gemm GF/s: a profiled engine run on the first images (--sample-images): "
        "the share of its operator time in GEMMs (mm, addmm, bmm, baddbmm) and the rate they ran at. An engine sits "
        "above its floor by its GEMMs running below the floor's rate at their shapes, and by the time outside them."
        if rows else ""
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 images x 500 captions, loop on 100")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--loop-captions", type=int, default=500, help="time the loop on this many captions and extrapolate")
    parser.add_argument("--methods", default="scan-t2i,sgr,saf,cefg-sgr,cefg-saf",
                        help="comma list of scan-t2i, scan-i2t, sgr, saf (sgraf = both), lhsc, cefg-sgr, cefg-saf (cefg = both)")
    parser.add_argument("--sgraf-captions", type=int, default=1000, help="SGRAF and LHSC run on this many captions (slow methods)")
    parser.add_argument("--sgraf-loop-captions", type=int, default=50, help="time SGRAF's and LHSC's loops on this many captions")
    parser.add_argument("--lhsc-img-dim", type=int, default=2048, help="LHSC's raw region feature size (BUTD: 2048)")
    parser.add_argument("--lhsc-word-dim", type=int, default=300, help="LHSC's word embedding size")
    parser.add_argument("--cefg-captions", type=int, default=100, help="CEFG runs on this many captions (slowest method)")
    parser.add_argument("--cefg-loop-captions", type=int, default=10, help="time CEFG's loop on this many captions")
    parser.add_argument("--sample-images", type=int, default=50,
                        help="profile the engine once more on this many images for the gemm %% / gemm GF/s columns (0: skip)")
    parser.add_argument("--budget-mib", type=float, default=None, help="engine memory budget (default: the engine's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.captions, args.loop_captions = 100, 500, 100
        args.sgraf_captions, args.sgraf_loop_captions = min(args.sgraf_captions, 200), min(args.sgraf_loop_captions, 20)
        args.cefg_captions, args.cefg_loop_captions = min(args.cefg_captions, 50), min(args.cefg_loop_captions, 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    budget = None if args.budget_mib is None else int(args.budget_mib * 2**20)

    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    pairs = {"sgraf": ("sgr", "saf"), "cefg": ("cefg-sgr", "cefg-saf")}
    methods = [part for m in methods for part in pairs.get(m, (m,))]
    lengths, source = caption_lengths(args.captions, rng)
    caption_lengths_t = torch.as_tensor(lengths, dtype=torch.long)
    # the shared unit-vector inputs (1.8 GiB at f30k shapes) only where a row reads them: LHSC
    # builds its own raw inputs, and its peak memory should not carry these
    if any(m != "lhsc" for m in methods):
        images = unit_sets(args.images, np.full(args.images, args.regions), args.dim, generator)
        captions = unit_sets(args.captions, lengths, args.dim, generator)
        inputs = f"inputs {(images.feats.numel() + captions.feats.numel()) * 4 / 2**30:.2f} GiB"
    else:
        images = captions = None
        inputs = "inputs: LHSC's own raw features and word ids"
    notes = [
        f"pairwise engine benchmark: {args.images} images x {args.regions} regions x {args.dim} dims, "
        f"{args.captions} captions; lengths from {source}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; engine budget "
        f"{'default' if budget is None else f'{args.budget_mib:g} MiB'}; {inputs}",
    ]
    gemm_peak = measure_gemm_gflops(args.dim, 256)
    rows: list[Row] = []
    for method in methods:
        if method in ("scan-t2i", "scan-i2t"):
            direction = method.split("-")[1]
            cfg = SCANConfig(
                img_dim=4, embed_size=args.dim, cross_attn=direction, agg_func="LogSumExp",
                lambda_softmax=9.0 if direction == "t2i" else 4.0, lambda_lse=6.0 if direction == "t2i" else 5.0,
            )  # fmt: skip
            model = SCAN(cfg, TextConfig(kind="bigru", word_dim=4), vocab_size=8).eval()
            flops = scan_flops(direction, captions.lengths.numpy(), args.images, args.regions, args.dim)
            rows.append(
                compare(
                    method, model, images, captions,
                    lambda n, cfg=cfg: reference_loop_scan(images, captions, cfg, n),
                    args.loop_captions, budget, flops, gemm_peak, sample_images=args.sample_images,
                )  # fmt: skip
            )
        elif method in ("sgr", "saf"):
            rows.append(_sgraf_row(method.upper(), args, images, captions, budget, generator, notes, gemm_peak))
        elif method == "lhsc":
            rows.append(_lhsc_row(args, caption_lengths_t, budget, generator, notes, gemm_peak))
        elif method in ("cefg-sgr", "cefg-saf"):
            rows.append(_cefg_row(method.split("-")[1].upper(), args, captions, budget, generator, notes, gemm_peak))
        else:
            parser.error(f"--methods: expected scan-t2i, scan-i2t, sgr, saf, sgraf (both), lhsc, cefg-sgr, cefg-saf "
                         f"or cefg (both), found {method!r}")
    # a shared or frequency-scaling machine drifts by tens of percent: the yardstick is the best
    # GEMM rate seen before and after the runs, so the floor is never overstated
    gemm_start, gemm_end = gemm_peak, measure_gemm_gflops(args.dim, 256)
    gemm_peak = max(gemm_start, gemm_end)
    notes.append(
        f"measured fp32 GEMM rate [8192, {args.dim}] x [{args.dim}, 256]: {gemm_start:.0f} GFLOP/s before, "
        f"{gemm_end:.0f} after; the floor uses {gemm_peak:.0f}"
    )
    rows = [with_gemm_peak(r, gemm_peak) for r in rows]
    print(report(rows, notes), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"notes": notes, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


def _sgraf_row(module, args, images, captions, budget, generator, notes, gemm_peak) -> Row:
    from itmkit.methods import sgraf

    cfg = sgraf.SGRAFConfig(module=module, img_dim=4, embed_size=args.dim, num_regions=args.regions)
    model = sgraf.SGRAF(cfg, TextConfig(kind="bigru", word_dim=4), 8).eval()
    n_cap = min(args.sgraf_captions, len(captions))
    caps = captions.slice(0, n_cap)
    d = args.dim
    # the global vectors are image-only / caption-only (VisualSA, TextSA): given, as to the engine
    img_global = F.normalize(torch.randn(len(images), d, generator=generator), dim=-1)
    cap_global = F.normalize(torch.randn(n_cap, d, generator=generator), dim=-1)
    images_g = Encoded(images.feats, images.lengths, {"global": img_global})
    caps_g = Encoded(caps.feats, caps.lengths, {"global": cap_global})
    notes.append(f"{module}: random weights, d={d}, s={cfg.sim_dim}, {cfg.sgr_step} steps, first {n_cap} captions")
    flops = sgraf_flops(module, caps.lengths.numpy(), len(images), args.regions, d, cfg.sim_dim, cfg.sgr_step)
    return compare(
        module.lower(), model, images_g, caps_g,
        lambda n: reference_loop_sgraf(model, images_g, caps_g, n),
        min(args.sgraf_loop_captions, n_cap), budget, flops, gemm_peak, sample_images=args.sample_images,
    )  # fmt: skip


def _lhsc_row(args, lengths: torch.Tensor, budget, generator, notes, gemm_peak) -> Row:
    """LHSC from raw inputs: region features ``[n_img, R, img_dim]`` (non-negative, like BUTD's
    ReLU outputs) and word ids with the real caption lengths; the model is built at paper sizes
    with random weights and region-block BatchNorms calibrated on the images (lhsc.md §8.6: with
    gamma 0 the blocks would be the identity, with random statistics they overflow)."""
    from itmkit.methods import lhsc

    d, R = args.dim, args.regions
    cfg = lhsc.LHSCConfig(img_dim=args.lhsc_img_dim, embed_size=d, num_regions=R)
    vocab = 8481  # the f30k SCAN vocabulary
    model = lhsc.LHSC(cfg, TextConfig(kind="bigru", word_dim=args.lhsc_word_dim), vocab + 1)
    n_cap = min(args.sgraf_captions, len(lengths))
    lengths = lengths[:n_cap]
    raw = Encoded(torch.rand(args.images, R, args.lhsc_img_dim, generator=generator), torch.full((args.images,), R))
    tokens = torch.randint(4, vocab, (n_cap, int(lengths.max())), generator=generator)
    tokens = tokens.masked_fill(torch.arange(tokens.shape[1])[None] >= lengths[:, None], 0)
    calibrate_region_blocks(model, raw, generator)
    model.eval()
    batch = 100  # the reference's encode_data batches (lhsc.md §4); the evaluator does the same for LHSC

    encoded: dict[str, Encoded] = {}

    def engine():
        # batches written into place, as the evaluator encodes a split (EncodedWriter: the result
        # plus one batch in memory, not every batch and their concatenation)
        images, captions = EncodedWriter(len(raw)), EncodedWriter(n_cap, t_max=int(lengths.max()))
        for i in range(0, len(raw), batch):
            images.write(range(i, min(i + batch, len(raw))), model.encode_images(raw.feats[i : i + batch], raw.lengths[i : i + batch]))
        for i in range(0, n_cap, batch):
            captions.write(range(i, min(i + batch, n_cap)),
                           model.encode_captions(tokens[i : i + batch].contiguous(), lengths[i : i + batch]))  # fmt: skip
        encoded.update(images=images.result(), captions=captions.result())
        return pairwise_similarity(model, encoded["images"], encoded["captions"], memory_budget=budget, progress=True,
                                   desc="lhsc")  # fmt: skip

    def sample():  # the pairwise part alone, on the encodings the timed run made
        images = encoded["images"].slice(0, min(args.sample_images, args.images))
        return pairwise_similarity(model, images, encoded["captions"], memory_budget=budget)

    per_caption, _, fixed = lhsc_flops(lengths.numpy(), args.images, R, d, cfg.sim_dim, args.lhsc_word_dim, args.lhsc_img_dim)
    notes.append(
        f"LHSC: random weights, raw {args.lhsc_img_dim}-d regions and word ids in (encoders timed, in batches of {batch}), "
        f"d={d}, s={cfg.sim_dim}, word dim {args.lhsc_word_dim}, first {n_cap} captions"
    )
    return compare(
        "lhsc", model, raw, Encoded(tokens[..., None].float(), lengths),
        lambda n: reference_loop_lhsc(model, raw, tokens, lengths, n),
        min(args.sgraf_loop_captions, n_cap), budget, (per_caption, per_caption), gemm_peak, engine_fn=engine,
        fixed_flops=fixed, sample_fn=sample if args.sample_images > 0 else None,
    )  # fmt: skip


@torch.no_grad()
def calibrate_region_blocks(model, raw: Encoded, generator: torch.Generator, n: int = 100) -> None:
    """Give LHSC's region-block BatchNorms gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1²) and running
    statistics of the first ``n`` images (one train-mode pass with a cumulative average)."""
    for block in model.image.graph.blocks:
        block.bn.weight.copy_(0.5 + torch.rand(block.bn.weight.shape, generator=generator))
        block.bn.bias.copy_(0.1 * torch.randn(block.bn.bias.shape, generator=generator))
        block.bn.reset_running_stats()
        block.bn.momentum = None
    model.image.train()
    model.image(raw.feats[:n], raw.lengths[:n])
    model.image.eval()
    for block in model.image.graph.blocks:
        block.bn.momentum = 0.1




def _cefg_row(module, args, captions, budget, generator, notes, gemm_peak) -> Row:
    from itmkit.methods import cefg

    cfg = cefg.CEFGConfig(module=module, img_dim=4, embed_size=args.dim, num_regions=args.regions)
    model = cefg.CEFG(cfg, TextConfig(kind="bigru", word_dim=4), 8).eval()
    n_cap = min(args.cefg_captions, len(captions))
    caps = captions.slice(0, n_cap)
    d, R2 = args.dim, 2 * args.regions
    # the image side (context module, GRU) runs once per image at encode time: its outputs, the
    # 2R enhanced regions and the global vector, are given to both, like SGRAF's global vectors
    enhanced = unit_sets(args.images, np.full(args.images, R2), d, generator)
    img_global = F.normalize(torch.randn(args.images, d, generator=generator), dim=-1)
    cap_global = F.normalize(torch.randn(n_cap, d, generator=generator), dim=-1)
    images_g = Encoded(enhanced.feats, enhanced.lengths, {"global": img_global})
    caps_g = Encoded(caps.feats, caps.lengths, {"global": cap_global})
    notes.append(f"cefg-{module.lower()}: random weights, d={d}, s={cfg.sim_dim}, {R2} enhanced regions, "
                 f"{cfg.rcr_steps} regulator rounds, first {n_cap} captions")  # fmt: skip
    flops = cefg_flops(module, caps.lengths.numpy(), args.images, R2, d, cfg.sim_dim, cfg.sgr_step, cfg.rcr_steps)
    return compare(
        f"cefg-{module.lower()}", model, images_g, caps_g,
        lambda n: reference_loop_cefg(model, images_g, caps_g, n),
        min(args.cefg_loop_captions, n_cap), budget, flops, gemm_peak, sample_images=args.sample_images,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
