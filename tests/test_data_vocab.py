"""Vocabulary and word tokenisation (baselines.md §A.2), on hand-made and real SCAN files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from itmkit.data.errors import DataFormatError
from itmkit.data.precomp import read_captions
from itmkit.data.tokenize import word_tokenize
from itmkit.data.vocab import Vocabulary
from itmkit.paths import scan_text_dir


def test_word_tokenize_lowercases_and_splits_punctuation(monkeypatch):
    import nltk

    def no_download(*args, **kwargs):
        raise AssertionError("nltk.download must never be called")

    monkeypatch.setattr(nltk, "download", no_download)
    assert word_tokenize("Two DOGS, one cat's ball.") == ["two", "dogs", ",", "one", "cat", "'s", "ball", "."]
    assert word_tokenize("A man isn't here") == ["a", "man", "is", "n't", "here"]
    assert word_tokenize("Hyphen-ated words stay") == ["hyphen-ated", "words", "stay"]


def test_build_keeps_frequent_words_in_first_seen_order():
    captions = ["A cat sat.", "The dog sat", "a DOG ran", "the cat ran", "dog and cat"]
    # counts: a 2, cat 3, sat 2, . 1, the 2, dog 3, ran 2, and 1
    vocab = Vocabulary.build(captions, threshold=2)
    assert vocab.idx2word == ["<pad>", "<start>", "<end>", "<unk>", "a", "cat", "sat", "the", "dog", "ran"]
    assert Vocabulary.build(captions, threshold=3).idx2word[4:] == ["cat", "dog"]
    assert len(Vocabulary.build(captions, threshold=4)) == 4


def test_encode_wraps_start_end_and_maps_unknown():
    vocab = Vocabulary([*Vocabulary.SPECIALS, "a", "dog", "runs"])
    assert vocab.encode("A dog runs fast") == [1, 4, 5, 6, 3, 2]
    assert vocab.encode("") == [1, 2]
    assert vocab("zebra") == Vocabulary.UNK and vocab("dog") == 5 and "dog" in vocab
    assert vocab.decode([1, 4, 99, 2]) == ["<start>", "a", "<unk>", "<end>"]


def test_json_roundtrip_hand_made(tmp_path):
    vocab = Vocabulary.build(["x y z", "x y", "x"], threshold=2)
    vocab.to_json(tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text())
    assert data == {"idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "x", "5": "y"},
                    "word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "x": 4, "y": 5}, "idx": 6}
    again = Vocabulary.from_json(tmp_path / "v.json")
    assert again.idx2word == vocab.idx2word and again.word2idx == vocab.word2idx


def _valid() -> dict:
    return Vocabulary([*Vocabulary.SPECIALS, "a", "b"]).to_dict()


def _break(case: str) -> tuple[object, str]:
    data = _valid()
    if case == "missing word2idx":
        del data["word2idx"]
        return data, "word2idx"
    if case == "disagree":
        data["word2idx"]["a"], data["word2idx"]["b"] = 5, 4
        return data, "word2idx['a']"
    if case == "idx wrong":
        data["idx"] = 9
        return data, "idx"
    if case == "gap in idx2word":
        data["idx2word"]["7"] = data["idx2word"].pop("5")
        return data, 'no key "5"'
    if case == "extra word2idx":
        data["word2idx"]["c"] = 6
        return data, "7 entries"
    if case == "specials":
        data["idx2word"]["1"], data["idx2word"]["4"] = "a", "<start>"
        data["word2idx"]["a"], data["word2idx"]["<start>"] = 1, 4
        return data, "idx2word 0-3"
    if case == "not an object":
        return [1, 2], "top level"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing word2idx", "disagree", "idx wrong", "gap in idx2word", "extra word2idx", "specials", "not an object"])
def test_corrupt_vocab_raises(tmp_path, case):
    data, fragment = _break(case)
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError) as caught:
        Vocabulary.from_json(path)
    assert "vocab.json" in str(caught.value) and fragment in str(caught.value), str(caught.value)


def test_invalid_json_and_missing_file(tmp_path):
    (tmp_path / "vocab.json").write_text('{"idx2word": {"0": "<pad>"')
    with pytest.raises(DataFormatError, match="valid JSON"):
        Vocabulary.from_json(tmp_path / "vocab.json")
    with pytest.raises(DataFormatError, match="no such file"):
        Vocabulary.from_json(tmp_path / "absent.json")


# --- real SCAN files ------------------------------------------------------------------------
def _real(name: str) -> Path:
    path = scan_text_dir() / name
    if not path.is_file():
        pytest.skip(f"real SCAN file {path} absent (set ITMKIT_SCAN_TEXT)")
    return path


@pytest.mark.parametrize("name,size", [("f30k", 8481), ("coco", 11353)])
def test_real_vocab_roundtrips_exactly(tmp_path, name, size):
    path = _real(f"vocab/{name}_precomp_vocab.json")
    vocab = Vocabulary.from_json(path)
    assert len(vocab) == size and vocab.idx2word[:4] == list(Vocabulary.SPECIALS)
    vocab.to_json(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(path.read_text())
    assert (tmp_path / "out.json").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("name,allowed_missing", [("f30k", set()), ("coco", {".."})])
def test_real_vocab_follows_the_build_rule_on_dev(name, allowed_missing):
    """The released vocabularies were built from train + dev with count >= 4, so every dev word
    seen >= 4 times in dev alone must be in them. COCO lacks ".." (SCAN tokenised with punkt
    sentence splitting, which cuts "..": one of the rare differences of ``preserve_line``)."""
    vocab = Vocabulary.from_json(_real(f"vocab/{name}_precomp_vocab.json"))
    captions = read_captions(_real(f"{name}_precomp/dev_caps.txt"))
    counts = Counter(t for c in captions for t in word_tokenize(c))
    frequent = {w for w, n in counts.items() if n >= 4}
    assert len(frequent) > 1000
    assert frequent - set(vocab.word2idx) == allowed_missing
    built = Vocabulary.build(captions, threshold=4)
    assert set(built.idx2word) == frequent | set(Vocabulary.SPECIALS)
    # first-seen order: the first caption's frequent words come first, in caption order
    first = [w for w in dict.fromkeys(word_tokenize(captions[0])) if w in frequent]
    assert built.idx2word[4 : 4 + len(first)] == first
