"""Evaluate a model on a precomp split: encode once, score every pair, rank (baselines.md §C).

1. :func:`encode_split`: every unique image and every caption encoded once, in eval mode,
   without gradients (``Encoded`` ``[n_img, ...]`` and ``[n_cap, ...]``).
2. :func:`similarity_matrix`: ``S [n_img, n_cap]``; embedding methods by a matrix product in
   caption shards, pairwise methods through ``model.similarity`` (the tiled engine).
3. :mod:`itmkit.evaluate.protocols`: recalls under the chosen protocols.

Scores are checked before ranking: NaN or Inf anywhere, or a collapsed matrix (every score
alike, :mod:`itmkit.evaluate.collapse`), is an error naming the model and the split.

Precision (``score_dtype``): ``"float32"`` by default (half the memory: a COCO 5K matrix is
0.5 GB instead of 1 GB). ``"float64"`` reproduces the references exactly: their
``encode_data`` stores embeddings in float64 arrays, so an embedding method's dot products run
in float64 and near-ties order as theirs do (seen on a COCO 5K-sized matrix: one image and one
caption one rank apart in float32). Pairwise methods score in float32 either way (so do the
references, which only store those scores in float64); ``"float64"`` then just stores them so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from itmkit.data.loaders import image_batches, pad_token_lists
from itmkit.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit
from itmkit.encoded import Encoded, EncodedWriter
from itmkit.evaluate.atomic_write import atomic_path, remove_stale_temp_files
from itmkit.evaluate.collapse import check_not_collapsed
from itmkit.evaluate.protocols import Protocol, check_protocol_size, default_protocols, evaluate_protocols
from itmkit.evaluate.result import EvalResult
from itmkit.evaluate.similarity_file import save_similarity
from itmkit.models.base import MatchingModel, eval_mode

__all__ = [
    "encode_split", "encode_split_images", "encode_texts", "similarity_matrix", "evaluate_split", "evaluate_model",
    "save_similarity", "EvalResult",
]  # fmt: skip

# Captions scored per matrix product for embedding methods: bounds the temporary to
# n_img x 4096 floats (80 MB for COCO's 5,000 images) whatever the caption count.
_CAPTION_SHARD = 4096


SCORE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _model_device(model: MatchingModel) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def score_dtype_of(score_dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float64"`` (or the torch dtype) -> the torch dtype; others raise."""
    if isinstance(score_dtype, torch.dtype) and score_dtype in SCORE_DTYPES.values():
        return score_dtype
    if isinstance(score_dtype, str) and score_dtype in SCORE_DTYPES:
        return SCORE_DTYPES[score_dtype]
    raise ValueError(f"score_dtype: expected one of {sorted(SCORE_DTYPES)}, found {score_dtype!r}")


def _allocate_scores(out, shape: tuple[int, int], dtype: torch.dtype):
    """The result buffer: ``out`` itself (shape checked), a memmapped ``.npy`` at a path, or a tensor."""
    if isinstance(out, (str, Path)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        return np.lib.format.open_memmap(out, mode="w+", dtype=np_dtype, shape=shape)
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if tuple(out.shape) != shape:
        raise ValueError(f"similarity_matrix: out has shape {tuple(out.shape)}, expected {shape}")
    return out


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
    split, pipeline = model.prepare_data(split, pipeline)
    was_training = model.training
    model.eval()
    try:
        n_img_batches = -(-split.n_images // batch_size)
        images = EncodedWriter(split.n_images)
        start = 0
        for feats, lengths in tqdm(image_batches(split, batch_size), total=n_img_batches,
                                   desc=f"encode {split.split} images", disable=not progress, leave=False):  # fmt: skip
            images.write(range(start, start + len(feats)), model.encode_images(feats.to(device), lengths.to(device)))
            start += len(feats)
        captions = _encode_captions_by_length(model, split, pipeline, batch_size, device, progress)
    finally:
        model.train(was_training)
    return images.result(), captions


def _encode_captions_by_length(model, split: PrecompSplit, pipeline, batch_size: int, device, progress: bool) -> Encoded:
    """Captions encoded in batches of similar length (longest first), returned in split order.

    Real caption files mix 8- and 60-token captions; batching them in file order pads most
    batches to the longest one. Encoders are padding-invariant, so only the speed changes; a
    model whose ``batch_dependent_captions`` is True (LHSC's reference word attention reads the
    padding, lhsc.md §3.2) is encoded in file order instead, in the reference's batches.
    """
    ids = [pipeline.encode(c) for c in tqdm(split.captions, desc=f"tokenise {split.split}", disable=not progress,
                                            leave=False)]  # fmt: skip
    if getattr(model, "batch_dependent_captions", False):
        order = np.arange(len(ids))
    else:
        order = np.argsort(-np.array([len(t) for t in ids]), kind="stable")
    # each batch is written straight to its captions' rows: no concatenated copy, no reordering copy
    captions = EncodedWriter(len(ids), t_max=max((len(t) for t in ids), default=None))
    for start in tqdm(range(0, len(ids), batch_size), desc=f"encode {split.split} captions", disable=not progress,
                      leave=False):  # fmt: skip
        rows = order[start : start + batch_size]
        tokens, lengths = pad_token_lists([ids[i] for i in rows], pipeline.pad_id)
        captions.write(torch.from_numpy(np.ascontiguousarray(rows)), model.encode_captions(tokens.to(device), lengths.to(device)))
    return captions.result()


@torch.no_grad()
def similarity_matrix(
    model: MatchingModel,
    images: Encoded,
    captions: Encoded,
    out: Tensor | np.ndarray | str | Path | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    score_dtype: str | torch.dtype = "float32",
    **engine_options,
) -> np.ndarray:
    """``S [n_img, n_cap]`` (float32, or float64 with ``score_dtype="float64"``, see the module
    docstring) for encoded images and captions.

    Embedding methods (§B.4): ``images.feats [n_img, d] @ captions.feats[shard].T`` per caption
    shard, in ``score_dtype``. Pairwise methods: ``model.similarity`` (the memory-bounded engine,
    float32 scores). ``out`` may be a preallocated array/tensor or a path for a memory-mapped
    ``.npy`` result (created in ``score_dtype``).
    """
    dtype = score_dtype_of(score_dtype)
    was_training = model.training
    model.eval()
    try:
        if model.pairwise:
            options = dict(engine_options, progress=progress)
            if device is not None:
                options["device"] = device
            result = _allocate_scores(out, (len(images), len(captions)), dtype)
            sims = model.similarity(images, captions, out=result, **options)
        else:
            sims = _embedding_similarity(model, images, captions, out, progress, device, dtype)
    finally:
        model.train(was_training)
    if isinstance(sims, Tensor):
        sims = sims.detach().cpu()
        return (sims if sims.dtype == torch.float64 else sims.float()).numpy()
    return sims


def _embedding_similarity(model, images: Encoded, captions: Encoded, out, progress, device, dtype) -> np.ndarray:
    n_img, n_cap = len(images), len(captions)
    result = _allocate_scores(out, (n_img, n_cap), dtype)
    device = torch.device(device) if device is not None else _model_device(model)
    if dtype == torch.float64 and device.type == "mps":
        device = torch.device("cpu")  # MPS has no float64
    img = images.to(device, dtype)
    for start in tqdm(range(0, n_cap, _CAPTION_SHARD), desc="similarity", disable=not progress, leave=False):
        cap = captions.slice(start, min(start + _CAPTION_SHARD, n_cap)).to(device, dtype)
        block = model.similarity(img, cap).cpu()
        if isinstance(result, Tensor):
            result[:, start : start + block.shape[1]] = block.to(result.dtype)
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
    score_dtype: str | torch.dtype = "float32",
    check_collapse: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Encode ``split``, build ``S``, evaluate under ``protocols`` (default by split name and size).

    Non-finite scores raise :class:`~itmkit.evaluate.metrics.NonFiniteScoresError`, collapsed
    ones :class:`~itmkit.evaluate.collapse.CollapsedScoresError` (unless ``check_collapse`` is
    off: the trainer checks every epoch itself), both naming the model and the split.
    ``compute_dtype`` (``torch.float16`` / ``torch.bfloat16``, CUDA only) feeds a pairwise
    method's engine blocks in reduced precision (scores stay float32); embedding methods ignore it.
    """
    protocols = default_protocols(split.split, split.n_images) if protocols is None else protocols
    for name in [protocols] if isinstance(protocols, (str, Protocol)) else protocols:
        check_protocol_size(name, split.n_images, split.n_captions, CAPTIONS_PER_IMAGE)  # before encoding
    images, captions = encode_split(model, split, pipeline, batch_size, device, progress)
    engine = {"compute_dtype": compute_dtype} if (compute_dtype is not None and model.pairwise) else {}
    sims = similarity_matrix(model, images, captions, out=sims_out, progress=progress, device=device,
                             score_dtype=score_dtype, **engine)  # fmt: skip
    source = f"scores of {type(model).__name__} on {Path(split.root) / split.split}"
    if check_collapse:
        check_not_collapsed(sims, source)
    metrics = evaluate_protocols(sims, protocols, CAPTIONS_PER_IMAGE, source)
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
    score_dtype: str | torch.dtype = "float32",
    compute_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``data_dir/{split}_*`` and (optionally) save the results.

    Args:
        protocol: a protocol name or list (``"test"``, ``"f30k-1k"``, ``"coco-5k"``,
            ``"coco-5fold-1k"``); default: both COCO settings for ``testall``, else ``"test"``.
        out_dir: if given, ``metrics.csv``, ``metrics.json`` and ``sims.npy`` (``[n_img, n_cap]``
            in ``score_dtype``, the ``sims`` of §C.3; ``npts`` = its row count) are written there,
            each atomically. The matrix is written memory-mapped, so a COCO 5K matrix is never
            held twice. Temporary files an interrupted evaluation left there are removed first.
        max_captions: evaluate only the first captions (dev validation uses 5,000, §A.1).
        score_dtype: ``"float32"`` (default) or ``"float64"`` (the references' precision; see the
            module docstring).
        compute_dtype: reduced-precision engine blocks on CUDA (see :func:`evaluate_split`).
    """
    if pipeline is None:
        raise ValueError("evaluate_model: a text pipeline is needed (itmkit.runs.load_run returns one)")
    opened = PrecompSplit.open(data_dir, split, max_captions=max_captions)
    if out_dir is None:
        return evaluate_split(model, opened, pipeline, protocol, batch_size, device, progress, score_dtype=score_dtype,
                              compute_dtype=compute_dtype)  # fmt: skip
    out = Path(out_dir)
    remove_stale_temp_files(out)
    with atomic_path(out / "sims.npy", suffix=".npy") as tmp:
        result = evaluate_split(model, opened, pipeline, protocol, batch_size, device, progress, sims_out=tmp,
                                score_dtype=score_dtype, compute_dtype=compute_dtype)  # fmt: skip
        result.save(out, save_sims=False)
    result.sims = np.load(out / "sims.npy", mmap_mode="r")
    return result


@torch.no_grad()
def encode_split_images(
    model: MatchingModel, split: PrecompSplit, images, device: torch.device | str | None = None, pipeline=None
) -> Encoded:
    """Encode some images of ``split`` (indices ``images``, in that order) as :func:`encode_split`
    does: the split passed through ``model.prepare_data`` (CEFG's adjacency columns, AAHR's global
    features; ``pipeline`` goes along, ``None`` where only images are read), eval mode, all
    ``n_regions`` regions, result on the CPU (``len == len(images)``)."""
    split, _ = model.prepare_data(split, pipeline)
    index = np.atleast_1d(np.asarray(images, dtype=np.int64))
    bad = index[(index < 0) | (index >= split.n_images)]
    if len(bad):
        raise IndexError(
            f"{split.root} split {split.split!r}: image {int(bad[0])}: expected an index in [0, {split.n_images})"
        )
    device = torch.device(device) if device is not None else _model_device(model)
    feats = torch.from_numpy(np.stack([split.image_features(int(i)) for i in index]))
    lengths = torch.full((len(index),), split.n_regions, dtype=torch.long)
    with eval_mode(model):
        return model.encode_images(feats.to(device), lengths.to(device)).to("cpu")


@torch.no_grad()
def encode_texts(model: MatchingModel, pipeline, texts, device: torch.device | str | None = None) -> Encoded:
    """Encode captions given as text (a split's or any other) with the run's text ``pipeline``,
    at test time (no augmentation), as :func:`encode_split` does; result on the CPU."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("encode_texts: expected at least one caption, found none")
    tokens, lengths = pad_token_lists([pipeline.encode(t) for t in texts], pipeline.pad_id)
    device = torch.device(device) if device is not None else _model_device(model)
    with eval_mode(model):
        return model.encode_captions(tokens.to(device), lengths.to(device)).to("cpu")
