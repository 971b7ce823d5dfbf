"""SCAN word vocabulary for BiGRU text encoders (baselines.md §A.2).

The JSON layout is SCAN's: ``{"idx2word": {"0": "<pad>", ...}, "word2idx": {"<pad>": 0, ...},
"idx": <size>}`` (``idx2word`` has string keys because JSON forces them). Ids 0-3 are
``<pad>``, ``<start>``, ``<end>``, ``<unk>``; words follow. :meth:`Vocabulary.to_json` writes the
keys in the order they were read, so the released files round-trip byte for byte.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from itmkit.data.errors import DataFormatError
from itmkit.data.tokenize import word_tokenize


class Vocabulary:
    """Word <-> id table with SCAN's four special tokens.

    Args:
        words: every word in id order, starting with ``SPECIALS``.
        word2idx_order: optional order of the ``word2idx`` keys when written back (the released
            files list them in an order unrelated to the ids; keeping it makes saving exact).
    """

    PAD, START, END, UNK = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")

    def __init__(self, words: Iterable[str], word2idx_order: Iterable[str] | None = None) -> None:
        self.idx2word: list[str] = list(words)
        if tuple(self.idx2word[:4]) != self.SPECIALS:
            raise ValueError(f"Vocabulary: the first four words must be {list(self.SPECIALS)}, got {self.idx2word[:4]}")
        self.word2idx: dict[str, int] = {word: i for i, word in enumerate(self.idx2word)}
        if len(self.word2idx) != len(self.idx2word):
            counts = Counter(self.idx2word)
            raise ValueError(f"Vocabulary: repeated words {sorted(w for w, c in counts.items() if c > 1)[:10]}")
        if word2idx_order is not None:
            order = list(word2idx_order)
            if sorted(order) != sorted(self.word2idx):
                raise ValueError("Vocabulary: word2idx_order must list exactly the vocabulary's words")
            self.word2idx = {word: self.word2idx[word] for word in order}

    # --- lookup ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def __call__(self, word: str) -> int:
        """Id of ``word``; unknown words map to ``<unk>`` (3), as SCAN's ``Vocabulary.__call__``."""
        return self.word2idx.get(word, self.UNK)

    def encode(self, caption: str) -> list[int]:
        """``[<start>] + ids(word_tokenize(caption)) + [<end>]`` (baselines.md §A.2)."""
        return [self.START, *(self.word2idx.get(t, self.UNK) for t in word_tokenize(caption)), self.END]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids`` (ids outside the table read as ``<unk>``)."""
        n = len(self.idx2word)
        return [self.idx2word[i] if 0 <= i < n else self.SPECIALS[self.UNK] for i in ids]

    # --- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4, progress: bool = False) -> "Vocabulary":
        """SCAN's rule: count nltk tokens of the lower-cased captions, keep words with
        ``count >= threshold``, in first-seen order after the four specials (baselines.md §A.2;
        SCAN and VSE∞-BiGRU build from train + dev captions)."""
        counts: Counter[str] = Counter()
        for caption in tqdm(captions, desc="counting words", disable=not progress, leave=False):
            counts.update(word_tokenize(caption))
        # Counter keeps insertion order, i.e. the order in which words were first seen.
        kept = [word for word, count in counts.items() if count >= threshold and word not in cls.SPECIALS]
        return cls([*cls.SPECIALS, *kept])

    # --- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "idx2word": {str(i): word for i, word in enumerate(self.idx2word)},
            "word2idx": dict(self.word2idx),
            "idx": len(self.idx2word),
        }

    def to_json(self, path: str | Path) -> None:
        """Write SCAN's layout (``json.dump`` defaults, as the released files were written)."""
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: object, path: str | Path = "<vocabulary>") -> "Vocabulary":
        """Check and read SCAN's layout; every inconsistency raises :class:`DataFormatError`."""
        if not isinstance(data, dict):
            raise DataFormatError(path, "top level", "an object with word2idx, idx2word, idx", type(data).__name__)
        for key in ("word2idx", "idx2word", "idx"):
            if key not in data:
                raise DataFormatError(path, key, "a key of SCAN's vocabulary (word2idx, idx2word, idx)", f"keys {sorted(data)}")
        idx2word, word2idx, size = data["idx2word"], data["word2idx"], data["idx"]
        if not isinstance(idx2word, dict) or not isinstance(word2idx, dict):
            raise DataFormatError(path, "idx2word/word2idx", "two objects", f"{type(idx2word).__name__}, {type(word2idx).__name__}")
        if not isinstance(size, int) or size != len(idx2word):
            raise DataFormatError(path, "idx", f"the word count {len(idx2word)}", repr(size))
        words = []
        for i in range(size):
            if str(i) not in idx2word:
                raise DataFormatError(path, "idx2word", f'consecutive string keys "0" .. "{size - 1}"', f'no key "{i}"')
            words.append(idx2word[str(i)])
        if len(word2idx) != size:
            raise DataFormatError(path, "word2idx", f"{size} entries like idx2word", f"{len(word2idx)} entries")
        for i, word in enumerate(words):
            if word2idx.get(word) != i:
                raise DataFormatError(path, f"word2idx[{word!r}]", f"{i} (as idx2word[\"{i}\"])", repr(word2idx.get(word)))
        if tuple(words[:4]) != cls.SPECIALS:
            raise DataFormatError(path, "idx2word 0-3", list(cls.SPECIALS), words[:4])
        return cls(words, word2idx_order=word2idx)

    @classmethod
    def from_json(cls, path: str | Path) -> "Vocabulary":
        """Read a SCAN vocabulary file (e.g. ``f30k_precomp_vocab.json``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise DataFormatError(path, "file", "a SCAN vocabulary JSON", "no such file") from None
        except json.JSONDecodeError as err:
            raise DataFormatError(path, f"line {err.lineno} column {err.colno}", "valid JSON", err.msg) from None
        return cls.from_dict(data, path)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"


def coverage_by_threshold(counts: Mapping[str, int], held_out: Sequence[str], thresholds: Sequence[int] = (1, 2, 4, 8, 16)):
    """What SCAN's count threshold (baselines.md §A.2) keeps, and how much held-out text it covers.

    ``counts``: word counts of the captions the vocabulary is built from; ``held_out``: the
    tokens of other captions (e.g. the test split's). Returns a DataFrame with one row per
    threshold: ``threshold``, ``words`` (how many words have ``count >= threshold``) and
    ``coverage`` (% of the held-out tokens that are such words; the rest become ``<unk>``).
    """
    import pandas as pd

    if not held_out:
        raise ValueError("coverage_by_threshold: expected held-out tokens to measure coverage on, found none")
    rows = []
    for t in thresholds:
        if int(t) < 1:
            raise ValueError(f"coverage_by_threshold: thresholds are minimum counts >= 1, found {t}")
        kept = {w for w, n in counts.items() if n >= t}
        rows.append({"threshold": int(t), "words": len(kept), "coverage": 100 * sum(w in kept for w in held_out) / len(held_out)})
    return pd.DataFrame(rows)
