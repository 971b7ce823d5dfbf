"""Evaluate an (untrained) VSE∞ end to end on a precomp folder with Flickr30K's real test shapes.

    .venv/bin/python benchmarks/eval_f30k_shapes.py [--embed-size 1024] [--word-dim 300] [--keep DIR]

Writes ``test_ims.npy`` float32 ``[1000, 36, 2048]`` (synthetic values, 295 MB) and
``test_caps.txt`` (the real Flickr30K test captions when ``itmkit.paths.scan_text_dir()`` has
them, else 5,000 template captions), opens the split memory-mapped and runs the evaluator:
encode 1,000 images and 5,000 captions, the 1,000 x 5,000 matrix, the f30k-1k metrics, and the
saved ``sims.npy``. Prints each stage's time and the process's peak resident memory.
Default model dims are the paper's (d = 1024, BiGRU word_dim 300, the real f30k vocabulary).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from itmkit.config import TextConfig, replace_nested
from itmkit.data.precomp import PrecompSplit, read_captions
from itmkit.data.text import build_text_pipeline
from itmkit.evaluate.evaluator import evaluate_model
from itmkit.evaluate.synthetic_precomp import write_synthetic_precomp
from itmkit.methods.registry import get_method
from itmkit.paths import scan_text_dir

F30K_TEST_IMAGES, F30K_REGIONS, F30K_FEATURE_DIM = 1000, 36, 2048


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def real_f30k_test_captions() -> list[str] | None:
    path = scan_text_dir() / "f30k_precomp" / "test_caps.txt"
    return read_captions(path) if path.is_file() else None


def build_f30k_shaped_folder(root: Path, seed: int = 0) -> tuple[Path, bool]:
    """The test split with f30k's shapes in ``root``; returns (folder, real captions used)."""
    captions = real_f30k_test_captions()
    write_synthetic_precomp(root, {"test": F30K_TEST_IMAGES}, n_regions=F30K_REGIONS, feature_dim=F30K_FEATURE_DIM,
                            seed=seed, captions={"test": captions} if captions else None)  # fmt: skip
    return root, captions is not None


def run(root: Path, embed_size: int = 1024, word_dim: int = 300, batch_size: int = 128,
        device: str = "cpu", progress: bool = False, seed: int = 0) -> dict:
    """Build the folder, evaluate an untrained VSE∞ of the given dims; returns timings (s) and sizes."""
    timings = {}
    start = time.perf_counter()
    folder, real = build_f30k_shaped_folder(root, seed)
    timings["write_s"] = time.perf_counter() - start

    start = time.perf_counter()
    split = PrecompSplit.open(folder, "test")
    timings["open_s"] = time.perf_counter() - start

    vocab = scan_text_dir() / "vocab" / "f30k_precomp_vocab.json"
    text = TextConfig(kind="bigru", word_dim=word_dim, vocab_path=str(vocab) if vocab.is_file() else None)
    pipeline = build_text_pipeline(text, split.captions, folder)
    cfg = replace_nested(get_method("vse_infty").preset("paper-f30k-bigru"),
                         {"model.embed_size": embed_size, "model.img_dim": F30K_FEATURE_DIM, "text": text})  # fmt: skip
    torch.manual_seed(seed)
    model = get_method("vse_infty").build(cfg, pipeline.vocab_size).to(device).eval()

    start = time.perf_counter()
    result = evaluate_model(model, folder, "test", pipeline, protocol="f30k-1k", out_dir=root / "eval",
                            batch_size=batch_size, device=device, progress=progress)  # fmt: skip
    timings["evaluate_s"] = time.perf_counter() - start
    return {
        **timings,
        "sims_shape": tuple(result.sims.shape),
        "rsum": result.metric("rsum"),
        "real_captions": real,
        "features_mb": split.images.nbytes / 2**20,
        "features_memmapped": hasattr(split.images, "filename") or getattr(split.images, "base", None) is not None,
        "parameters": model.describe()["parameters"],
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embed-size", type=int, default=1024)
    parser.add_argument("--word-dim", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", help="write the folder here instead of a temporary one")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; peak RSS before: {peak_rss_mb():.0f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        stats = run(root, args.embed_size, args.word_dim, args.batch_size, args.device, progress=True)
    for key, value in stats.items():
        print(f"{key:>20}: {value:.2f}" if isinstance(value, float) else f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
