"""Training-time augmentation of VSE∞ as pure functions of an ``np.random.Generator``
(baselines.md §A.5). Dev/test never call these.

Token rule (bigru and master branches): each position (a token id, or a whole word's pieces)
draws ``p ~ U(0, 1)``; if ``p < 0.2`` it is altered by ``q = p / 0.2``: ``q < 0.5`` -> mask,
``q < 0.6`` -> a uniformly random id, else deleted. Per position: 10 % masked, 2 % random,
8 % deleted, 80 % kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALTER_RATE = 0.2  # p < 0.2 alters a token
MASK_SHARE = 0.5  # of the altered: q < 0.5 -> mask
RANDOM_SHARE = 0.6  # 0.5 <= q < 0.6 -> random id, else delete (the reference comment says "keep"; the code deletes)
REGION_DROP_RATE = 0.2

KEEP, MASK, RANDOM, DELETE = 0, 1, 2, 3


def token_actions(n: int, rng: np.random.Generator, rate: float = ALTER_RATE) -> np.ndarray:
    """``[n]`` int8 action per position: ``KEEP``, ``MASK``, ``RANDOM`` or ``DELETE`` (§A.5)."""
    p = rng.random(n)
    q = p / rate
    actions = np.full(n, KEEP, dtype=np.int8)
    altered = p < rate
    actions[altered & (q < MASK_SHARE)] = MASK
    actions[altered & (q >= MASK_SHARE) & (q < RANDOM_SHARE)] = RANDOM
    actions[altered & (q >= RANDOM_SHARE)] = DELETE
    return actions


def augment_word_ids(
    ids: Sequence[int], rng: np.random.Generator, mask_id: int, n_ids: int, rate: float = ALTER_RATE
) -> list[int]:
    """VSE∞-BiGRU caption augmentation over ``[<start>, words..., <end>]`` ids (§A.5).

    ``<start>``/``<end>`` are not protected (as in the reference). A random id is uniform in
    ``[0, n_ids)``; the reference draws ``randrange(len(vocab))`` after adding ``<mask>``, so
    ``n_ids`` is the vocabulary size including ``<mask>``.
    Our guard: if every position is deleted the caption is returned unaltered (an empty caption
    cannot be encoded; with >= 2 tokens this happens with probability <= 0.08**2).
    """
    ids_array = np.asarray(ids, dtype=np.int64)
    actions = token_actions(len(ids_array), rng, rate)
    random_ids = rng.integers(0, n_ids, size=len(ids_array))
    out = np.where(actions == MASK, mask_id, ids_array)
    out = np.where(actions == RANDOM, random_ids, out)
    kept = out[actions != DELETE]
    if len(kept) == 0:
        return [int(i) for i in ids_array]
    return kept.tolist()


def augment_word_pieces(
    words: Sequence[Sequence[int]], rng: np.random.Generator, mask_id: int, n_ids: int, rate: float = ALTER_RATE
) -> list[int]:
    """VSE∞-BERT caption augmentation: ``words`` are the word-piece ids of each basic-tokenizer
    word; one draw per **word** decides for all its pieces (§A.5): masked or random words
    replace every piece (a random id drawn per piece, as the reference), deleted words drop all.

    Returns the flat piece ids (without ``[CLS]``/``[SEP]``; the caller adds them).
    """
    actions = token_actions(len(words), rng, rate)
    n_pieces = sum(len(w) for w in words)
    random_ids = rng.integers(0, n_ids, size=n_pieces)
    out: list[int] = []
    cursor = 0
    for pieces, action in zip(words, actions):
        if action == KEEP:
            out.extend(int(i) for i in pieces)
        elif action == MASK:
            out.extend([mask_id] * len(pieces))
        elif action == RANDOM:
            out.extend(int(i) for i in random_ids[cursor : cursor + len(pieces)])
        cursor += len(pieces)
    return out


def drop_regions(n_regions: int, rng: np.random.Generator, rate: float = REGION_DROP_RATE) -> np.ndarray:
    """Indices (ascending) of the regions a training sample keeps: region ``j`` is kept iff
    ``U(0, 1) > rate``, independently (VSE∞ precomp path, §A.5).

    Our guard: at least one region is kept (the one with the largest draw), so a sample never
    becomes an empty set; the reference has no guard (probability ``rate ** n_regions``).
    """
    u = rng.random(n_regions)
    keep = np.flatnonzero(u > rate)
    if len(keep) == 0:
        keep = np.array([int(np.argmax(u))])
    return keep
