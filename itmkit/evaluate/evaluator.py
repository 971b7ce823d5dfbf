"""Evaluate a model on a precomp split: encode once, score every pair, rank (baselines.md §C).

1. :func:`encode_split`: every unique image and every caption encoded once, in eval mode,
   without gradients (``Encoded`` ``[n_img, ...]`` and ``[n_cap, ...]``).
2. :func:`similarity_matrix`: ``S [n_img, n_cap]``; embedding methods by a matrix product in
   caption shards, pairwise methods through ``model.similarity`` (the tiled engine).
3. :mod:`itmkit.evaluate.protocols`: recalls under the chosen protocols.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from itmkit.data.loaders import image_batches, pad_token_lists
from itmkit.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit
from itmkit.encoded import Encoded
from itmkit.evaluate.atomic_write import atomic_path
from itmkit.evaluate.protocols import Protocol, check_protocol_size, default_protocols, evaluate_protocols
from itmkit.evaluate.result import EvalResult
from itmkit.evaluate.similarity_file import save_similarity
from itmkit.models.base import MatchingModel

__all__ = ["encode_split", "similarity_matrix", "evaluate_split", "evaluate_model", "save_similarity", "EvalResult"]

# Captions scored per matrix product for embedding methods: bounds the temporary to
# n_img x 4096 floats (80 MB for COCO's 5,000 images) whatever the caption count.
_CAPTION_SHARD = 4096


def _model_device(model: MatchingModel) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def encode_split(
    model: MatchingModel,
    split: PrecompSplit,
    pipeline,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[Encoded, Encoded]:
    """Encode the split's unique images ``[n_img, K, D]`` and captions once (eval mode, no grad).

    Returns ``(images, captions)`` as :class:`Encoded` on the CPU: ``[n_img, d]`` /
    ``[n_cap, d]`` for embedding methods, padded sets with lengths for pairwise ones.
    The model's train/eval mode is restored afterwards.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, found {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        n_img_batches = -(-split.n_images // batch_size)
        images = [
            model.encode_images(feats.to(device), lengths.to(device)).to("cpu")
            for feats, lengths in tqdm(image_batches(split, batch_size), total=n_img_batches,
                                       desc=f"encode {split.split} images", disable=not progress, leave=False)
        ]  # fmt: skip
        captions = _encode_captions_by_length(model, split, pipeline, batch_size, device, progress)
    finally:
        model.train(was_training)
    return Encoded.cat(images), captions


def _encode_captions_by_length(model, split: PrecompSplit, pipeline, batch_size: int, device, progress: bool) -> Encoded:
    """Captions encoded in batches of similar length (longest first), returned in split order.

    Real caption files mix 8- and 60-token captions; batching them in file order pads most
    batches to the longest one. Encoders are padding-invariant, so only the speed changes.
    """
    ids = [pipeline.encode(c) for c in tqdm(split.captions, desc=f"tokenise {split.split}", disable=not progress,
                                            leave=False)]  # fmt: skip
    order = np.argsort(-np.array([len(t) for t in ids]), kind="stable")
    parts = []
    for start in tqdm(range(0, len(ids), batch_size), desc=f"encode {split.split} captions", disable=not progress,
                      leave=False):  # fmt: skip
        tokens, lengths = pad_token_lists([ids[i] for i in order[start : start + batch_size]], pipeline.pad_id)
        parts.append(model.encode_captions(tokens.to(device), lengths.to(device)).to("cpu"))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.from_numpy(order)] = torch.arange(len(order))
    return Encoded.cat(parts).select(inverse)


@torch.no_grad()
def similarity_matrix(
    model: MatchingModel,
    images: Encoded,
    captions: Encoded,
    out: Tensor | np.ndarray | str | Path | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    **engine_options,
) -> np.ndarray:
    """``S [n_img, n_cap]`` float32 for encoded images and captions.

    Embedding methods (§B.4): ``images.feats [n_img, d] @ captions.feats[shard].T`` per caption
    shard. Pairwise methods: ``model.similarity`` (the memory-bounded engine). ``out`` may be a
    preallocated array/tensor or a path for a memory-mapped ``.npy`` result.
    """
    was_training = model.training
    model.eval()
    try:
        if model.pairwise:
            options = dict(engine_options, progress=progress)
            if device is not None:
                options["device"] = device
            sims = model.similarity(images, captions, out=out, **options)
        else:
            sims = _embedding_similarity(model, images, captions, out, progress, device)
    finally:
        model.train(was_training)
    if isinstance(sims, Tensor):
        return sims.detach().float().cpu().numpy()
    return sims


def _embedding_similarity(model, images: Encoded, captions: Encoded, out, progress, device) -> np.ndarray:
    n_img, n_cap = len(images), len(captions)
    if isinstance(out, (str, Path)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        result = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n_img, n_cap))
    elif out is None:
        result = np.empty((n_img, n_cap), dtype=np.float32)
    else:
        if tuple(out.shape) != (n_img, n_cap):
            raise ValueError(f"similarity_matrix: out has shape {tuple(out.shape)}, expected {(n_img, n_cap)}")
        result = out
    device = torch.device(device) if device is not None else _model_device(model)
    img = images.to(device)
    for start in tqdm(range(0, n_cap, _CAPTION_SHARD), desc="similarity", disable=not progress, leave=False):
        cap = captions.slice(start, min(start + _CAPTION_SHARD, n_cap)).to(device)
        block = model.similarity(img, cap).float().cpu()
        if isinstance(result, Tensor):
            result[:, start : start + block.shape[1]] = block
        else:
            result[:, start : start + block.shape[1]] = block.numpy()
    if isinstance(result, np.memmap):
        result.flush()
    return result.numpy() if isinstance(result, Tensor) else result


def evaluate_split(
    model: MatchingModel,
    split: PrecompSplit,
    pipeline,
    protocols=None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    sims_out: str | Path | None = None,
) -> EvalResult:
    """Encode ``split``, build ``S``, evaluate under ``protocols`` (default by split name and size)."""
    protocols = default_protocols(split.split, split.n_images) if protocols is None else protocols
    for name in [protocols] if isinstance(protocols, (str, Protocol)) else protocols:
        check_protocol_size(name, split.n_images, split.n_captions, CAPTIONS_PER_IMAGE)  # before encoding
    images, captions = encode_split(model, split, pipeline, batch_size, device, progress)
    sims = similarity_matrix(model, images, captions, out=sims_out, progress=progress, device=device)
    metrics = evaluate_protocols(sims, protocols, CAPTIONS_PER_IMAGE)
    info = {"split": split.split, "data_dir": str(split.root), "n_images": split.n_images,
            "n_captions": split.n_captions, "method": type(model).__name__}  # fmt: skip
    return EvalResult(sims=sims, metrics=metrics, info=info)


def evaluate_model(
    model: MatchingModel,
    data_dir: str | Path,
    split: str = "test",
    pipeline=None,
    protocol=None,
    out_dir: str | Path | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    max_captions: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on ``data_dir/{split}_*`` and (optionally) save the results.

    Args:
        protocol: a protocol name or list (``"test"``, ``"f30k-1k"``, ``"coco-5k"``,
            ``"coco-5fold-1k"``); default: both COCO settings for ``testall``, else ``"test"``.
        out_dir: if given, ``metrics.csv``, ``metrics.json`` and ``sims.npy`` (float32
            ``[n_img, n_cap]``, the ``sims`` of §C.3; ``npts`` = its row count) are written there,
            each atomically. The matrix is written memory-mapped, so a COCO 5K matrix is never
            held twice.
        max_captions: evaluate only the first captions (dev validation uses 5,000, §A.1).
    """
    if pipeline is None:
        raise ValueError("evaluate_model: a text pipeline is needed (itmkit.runs.load_run returns one)")
    opened = PrecompSplit.open(data_dir, split, max_captions=max_captions)
    if out_dir is None:
        return evaluate_split(model, opened, pipeline, protocol, batch_size, device, progress)
    out = Path(out_dir)
    with atomic_path(out / "sims.npy", suffix=".npy") as tmp:
        result = evaluate_split(model, opened, pipeline, protocol, batch_size, device, progress, sims_out=tmp)
        result.save(out, save_sims=False)
    result.sims = np.load(out / "sims.npy", mmap_mode="r")
    return result
