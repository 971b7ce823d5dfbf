"""Word tokenisation for SCAN vocabularies (baselines.md §A.2).

SCAN and VSE∞-BiGRU call ``nltk.tokenize.word_tokenize(caption.lower())``, which needs the punkt
sentence model (a download). Each caption is one sentence, so ``preserve_line=True`` (no sentence
splitting, no download) gives the same tokens; itmkit never calls ``nltk.download``.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _treebank_word_tokenize():
    from nltk.tokenize import word_tokenize as nltk_word_tokenize

    return nltk_word_tokenize


def word_tokenize(text: str) -> list[str]:
    """Lower-cased nltk word tokens of one caption: ``"A dog's ball."`` -> ``["a", "dog", "'s", "ball", "."]``."""
    return _treebank_word_tokenize()(text.lower(), preserve_line=True)
