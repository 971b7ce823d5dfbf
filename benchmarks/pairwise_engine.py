"""Benchmark: the pairwise similarity engine against the reference-style loop (scan.md §4).

Flickr30K test shapes: 1000 images x 36 regions x 1024 dims, 5000 captions whose lengths come
from ``f30k_precomp/test_caps.txt`` tokenised as SCAN does (+2 for ``<start>``/``<end>``), random
unit vectors. In one run, on the same inputs, it times

(a) the straightforward reference-style loop (``xattn_score_t2i``: one caption at a time against
    all images, materialising the ``[n_img, L, d]`` attended vectors; fp32), and
(b) :func:`itmkit.similarity.engine.pairwise_similarity` on the full matrix,

for SCAN t2i (and i2t, and SGRAF when ``itmkit.methods.sgraf`` exists), and prints times, ratio,
peak memory of each, effective GFLOP/s and the max abs difference. The full loop takes ~11 min on
a 2-core CPU: ``--loop-captions N`` times it on the first N captions and extrapolates (the output
says so).

    python benchmarks/pairwise_engine.py              # f30k shapes, loop on 500 captions
    python benchmarks/pairwise_engine.py --quick      # 100 x 500, a few seconds
    python benchmarks/pairwise_engine.py --loop-captions 5000   # the whole loop (~11 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from itmkit.config import TextConfig
from itmkit.encoded import Encoded
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


def reference_loop_blocks(model, images: Encoded, captions: Encoded, n_captions: int) -> torch.Tensor:
    """The reference structure for any pairwise method: one caption at a time, all images."""
    out = torch.empty(len(images), n_captions)
    for j in tqdm(range(n_captions), desc="reference loop", unit="caption", leave=False):
        out[:, j] = model.score_block(images, captions.slice(j, j + 1))[:, 0]
    return out


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


def compare(name, model, images, captions, loop_fn, loop_captions, budget, flops_per_word_region) -> Row:
    n_img, n_cap = len(images), len(captions)
    loop_captions = min(loop_captions, n_cap)
    with torch.no_grad():
        with PeakMemory() as loop_mem:
            start = time.perf_counter()
            loop = loop_fn(loop_captions)
            loop_time = time.perf_counter() - start
        with PeakMemory() as engine_mem:
            start = time.perf_counter()
            sims = pairwise_similarity(model, images, captions, memory_budget=budget, progress=True, desc=name)
            engine_time = time.perf_counter() - start
    full_loop = loop_time * n_cap / loop_captions
    words = float(captions.lengths.sum())
    regions = images.feats.shape[1]
    gflops = flops_per_word_region * n_img * regions * words / engine_time / 1e9
    diff = float((sims[:, :loop_captions] - loop).abs().max())
    return Row(
        name, n_img, n_cap, loop_captions, loop_time, full_loop, loop_captions < n_cap, engine_time,
        full_loop / engine_time, loop_mem.peak_gib, loop_mem.extra_gib, engine_mem.peak_gib,
        engine_mem.extra_gib, gflops, diff,
    )  # fmt: skip


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(rows: list[Row], notes: list[str]) -> str:
    lines = [*notes, ""]
    header = (
        f"{'method':<12} {'matrix':>11} {'loop s':>9} {'engine s':>9} {'speedup':>8} "
        f"{'loop GiB':>9} {'eng GiB':>8} {'eng +GiB':>8} {'GFLOP/s':>8} {'max|diff|':>10}"
    )
    lines += [header, "-" * len(header)]
    for r in rows:
        loop = f"{r.loop_seconds_full:.1f}{'*' if r.loop_extrapolated else ''}"
        lines.append(
            f"{r.method:<12} {f'{r.n_images}x{r.n_captions}':>11} {loop:>9} {r.engine_seconds:>9.1f} "
            f"{r.speedup:>7.1f}x {_fmt(r.loop_peak_gib, '.2f'):>9} {_fmt(r.engine_peak_gib, '.2f'):>8} "
            f"{_fmt(r.engine_extra_gib, '.2f'):>8} {r.engine_gflops:>8.1f} {r.max_abs_diff:>10.2e}"
        )
    if any(r.loop_extrapolated for r in rows):
        lines.append(
            "* loop time extrapolated from the first --loop-captions captions (measured: "
            + ", ".join(f"{r.method} {r.loop_seconds_measured:.1f} s on {r.loop_captions}" for r in rows)
            + "); the difference is over those captions"
        )
    lines.append(
        "GiB: peak resident memory of the process during the phase (inputs included); eng +GiB: above "
        "the RSS at the start of the engine phase. GFLOP/s counts the word-region GEMM work "
        "(2·R·d per word-region pair; SGRAF: per its own count)."
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
    parser.add_argument("--methods", default="scan-t2i,sgraf", help="comma list of scan-t2i, scan-i2t, sgraf")
    parser.add_argument("--sgraf-captions", type=int, default=1000, help="SGRAF runs on this many captions (slow method)")
    parser.add_argument("--sgraf-loop-captions", type=int, default=50, help="time SGRAF's loop on this many captions")
    parser.add_argument("--budget-mib", type=float, default=None, help="engine memory budget (default: the engine's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.captions, args.loop_captions = 100, 500, 100
        args.sgraf_captions, args.sgraf_loop_captions = min(args.sgraf_captions, 200), min(args.sgraf_loop_captions, 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    budget = None if args.budget_mib is None else int(args.budget_mib * 2**20)

    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    lengths, source = caption_lengths(args.captions, rng)
    images = unit_sets(args.images, np.full(args.images, args.regions), args.dim, generator)
    captions = unit_sets(args.captions, lengths, args.dim, generator)
    notes = [
        f"pairwise engine benchmark: {args.images} images x {args.regions} regions x {args.dim} dims, "
        f"{args.captions} captions; lengths from {source}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; engine budget "
        f"{'default' if budget is None else f'{args.budget_mib:g} MiB'}; inputs "
        f"{(images.feats.numel() + captions.feats.numel()) * 4 / 2**30:.2f} GiB",
    ]
    rows: list[Row] = []
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        if method in ("scan-t2i", "scan-i2t"):
            direction = method.split("-")[1]
            cfg = SCANConfig(
                img_dim=4, embed_size=args.dim, cross_attn=direction, agg_func="LogSumExp",
                lambda_softmax=9.0 if direction == "t2i" else 4.0, lambda_lse=6.0 if direction == "t2i" else 5.0,
            )  # fmt: skip
            model = SCAN(cfg, TextConfig(kind="bigru", word_dim=4), vocab_size=8).eval()
            rows.append(
                compare(
                    method, model, images, captions,
                    lambda n, cfg=cfg: reference_loop_scan(images, captions, cfg, n),
                    args.loop_captions, budget, 2 * args.dim,
                )  # fmt: skip
            )
        elif method == "sgraf":
            row = _sgraf_row(args, images, captions, budget, generator, notes)
            if row is not None:
                rows.append(row)
        else:
            parser.error(f"--methods: expected scan-t2i, scan-i2t or sgraf, found {method!r}")
    print(report(rows, notes), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"notes": notes, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


def _sgraf_row(args, images, captions, budget, generator, notes) -> Row | None:
    try:
        from itmkit.methods import sgraf
    except ImportError:
        notes.append("SGRAF: itmkit.methods.sgraf not importable, skipped")
        return None
    cfg = sgraf.SGRAFConfig(img_dim=4, embed_size=args.dim, num_regions=args.regions)
    model = sgraf.SGRAF(cfg, TextConfig(kind="bigru", word_dim=4), 8).eval()
    n_cap = min(args.sgraf_captions, len(captions))
    caps = captions.slice(0, n_cap)
    d = args.dim
    img_global = F.normalize(torch.randn(len(images), d, generator=generator), dim=-1)
    cap_global = F.normalize(torch.randn(n_cap, d, generator=generator), dim=-1)
    images_g = Encoded(images.feats, images.lengths, {"global": img_global})
    caps_g = Encoded(caps.feats, caps.lengths, {"global": cap_global})
    notes.append(f"SGRAF (random weights, s={cfg.sim_dim}, {cfg.module}) on the first {n_cap} captions")
    # SGRAF's own cost model is method-specific; count the same word-region attention GEMM
    # plus the sim_tranloc_w projection (2·d·s per word, spread over the R regions)
    per_word_region = 2 * d + 2 * d * cfg.sim_dim / args.regions
    return compare(
        "sgraf", model, images_g, caps_g,
        lambda n: reference_loop_blocks(model, images_g, caps_g, n),
        min(args.sgraf_loop_captions, n_cap), budget, per_word_region,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
