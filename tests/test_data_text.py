"""Text pipelines and VSE∞ training augmentation (baselines.md §A.2, §A.5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from itmkit.config import TextConfig
from itmkit.data.augment import (
    DELETE,
    KEEP,
    MASK,
    RANDOM,
    augment_word_ids,
    augment_word_pieces,
    drop_regions,
    token_actions,
)
from itmkit.data.precomp import read_captions
from itmkit.data.text import (
    HFTokenizerPipeline,
    TextPipeline,
    WordIdPipeline,
    build_text_pipeline,
    default_hf_path,
)
from itmkit.data.vocab import Vocabulary
from itmkit.paths import scan_text_dir


def reference_word_ids(ids, p, random_ids, mask_id):
    """The bigru branch's loop, fed the same uniform draws ``p`` and random ids."""
    out, deleted = [], []
    for i, token in enumerate(ids):
        prob = p[i]
        if prob < 0.20:
            prob /= 0.20
            if prob < 0.5:
                out.append(mask_id)
            elif prob < 0.6:
                out.append(int(random_ids[i]))
            else:
                out.append(token)
                deleted.append(len(out) - 1)
        else:
            out.append(token)
    return [t for i, t in enumerate(out) if i not in deleted]


def test_word_id_augmentation_matches_the_reference_loop():
    ids = list(range(10, 40))
    for seed in range(300):
        draws = np.random.default_rng(seed)
        p, random_ids = draws.random(len(ids)), draws.integers(0, 1000, size=len(ids))
        expected = reference_word_ids(ids, p, random_ids, mask_id=999)
        got = augment_word_ids(ids, np.random.default_rng(seed), mask_id=999, n_ids=1000)
        if expected:  # our guard returns the caption unaltered when everything is deleted
            assert got == expected


def test_token_rates_are_10_2_8_percent():
    actions = token_actions(400_000, np.random.default_rng(0))
    rates = {a: float(np.mean(actions == a)) for a in (KEEP, MASK, RANDOM, DELETE)}
    # binomial std at n = 4e5 is <= 0.0007; allow ~6 sigma
    assert rates[MASK] == pytest.approx(0.10, abs=0.004)
    assert rates[RANDOM] == pytest.approx(0.02, abs=0.004)
    assert rates[DELETE] == pytest.approx(0.08, abs=0.004)
    assert rates[KEEP] == pytest.approx(0.80, abs=0.004)


def test_augmented_word_ids_rates_on_many_captions():
    rng = np.random.default_rng(1)
    mask_id, n_ids, token, length, n = 10**6, 10**6, 7, 20, 20_000
    masked = randomised = kept = 0
    for _ in range(n):
        out = np.array(augment_word_ids([token] * length, rng, mask_id=mask_id, n_ids=n_ids))
        masked += int((out == mask_id).sum())
        kept += int((out == token).sum())
        randomised += int(((out != mask_id) & (out != token)).sum())
    total = n * length
    assert masked / total == pytest.approx(0.10, abs=0.004)
    assert randomised / total == pytest.approx(0.02, abs=0.003)
    assert 1 - (masked + kept + randomised) / total == pytest.approx(0.08, abs=0.004)


def test_all_deleted_caption_is_returned_unaltered():
    class AlwaysDelete:
        def random(self, n):
            return np.full(n, 0.19)  # q = 0.95 -> delete

        def integers(self, low, high, size):
            return np.zeros(size, dtype=np.int64)

    assert augment_word_ids([1, 5, 2], AlwaysDelete(), mask_id=9, n_ids=10) == [1, 5, 2]


def reference_word_pieces(words, p, random_ids, mask_id):
    """The master branch's loop over basic-tokenizer words, with the same draws."""
    out, cursor = [], 0
    for k, pieces in enumerate(words):
        prob = p[k]
        if prob < 0.2 and prob / 0.2 < 0.5:
            out += [mask_id] * len(pieces)
        elif prob < 0.2 and prob / 0.2 < 0.6:
            out += [int(r) for r in random_ids[cursor : cursor + len(pieces)]]
        elif prob >= 0.2:
            out += list(pieces)
        cursor += len(pieces)
    return out


def test_word_pieces_of_one_word_are_altered_together():
    words = [[11, 12, 13, 14], [20], [30, 31]]
    fates = set()
    for seed in range(2000):
        draws = np.random.default_rng(seed)
        p, random_ids = draws.random(len(words)), draws.integers(0, 500, size=7)
        got = augment_word_pieces(words, np.random.default_rng(seed), mask_id=999, n_ids=500)
        assert got == reference_word_pieces(words, p, random_ids, mask_id=999)
        # one draw (p[0]) decides all four pieces of the first word
        q = p[0] / 0.2
        fate = "kept" if p[0] >= 0.2 else "masked" if q < 0.5 else "random" if q < 0.6 else "deleted"
        fates.add(fate)
        rest = reference_word_pieces(words[1:], p[1:], random_ids[4:], mask_id=999)
        expected_first = {"kept": [11, 12, 13, 14], "masked": [999] * 4,
                          "random": random_ids[:4].tolist(), "deleted": []}[fate]
        assert got == expected_first + rest
    assert fates == {"kept", "masked", "random", "deleted"}


def test_region_dropping_rate_and_guard():
    rng = np.random.default_rng(0)
    kept = [len(drop_regions(36, rng)) for _ in range(5000)]
    assert np.mean(kept) / 36 == pytest.approx(0.8, abs=0.005)
    idx = drop_regions(36, np.random.default_rng(3))
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 36
    # guard: with a drop rate of 0.99 on 2 regions almost every draw would empty the set
    assert all(len(drop_regions(2, rng, rate=0.99)) >= 1 for _ in range(500))
    u = np.random.default_rng(5).random(3)
    assert drop_regions(3, np.random.default_rng(5), rate=0.999).tolist() == [int(np.argmax(u))]


# --- pipelines ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_vocab():
    return Vocabulary([*Vocabulary.SPECIALS, "a", "dog", "runs", "."])


def test_word_id_pipeline_test_time_and_mask(small_vocab):
    pipe = WordIdPipeline(small_vocab)
    assert isinstance(pipe, TextPipeline)
    assert (pipe.vocab_size, pipe.mask_id, pipe.pad_id) == (9, 8, 0)
    assert pipe.encode("A dog runs.") == [1, 4, 5, 6, 7, 2] == pipe.encode("A dog runs.")
    assert pipe.tokens("A dog runs.") == ["<start>", "a", "dog", "runs", ".", "<end>"]
    seen = set()
    for seed in range(200):
        out = pipe.encode("a dog runs . a dog runs .", np.random.default_rng(seed))
        assert out == pipe.encode("a dog runs . a dog runs .", np.random.default_rng(seed))
        assert all(0 <= t < pipe.vocab_size for t in out)
        seen.update(out)
    assert pipe.mask_id in seen
    assert pipe.decode([1, 8, 2]) == ["<start>", "<mask>", "<end>"]
    first = pipe.encode("a dog")
    first.append(99)  # callers may modify what they get; the cache must not change
    assert pipe.encode("a dog") == [1, 4, 5, 2]
    import pickle

    again = pickle.loads(pickle.dumps(pipe))
    assert again.encode("A dog runs.") == pipe.encode("A dog runs.") and again.vocab_size == 9


@pytest.fixture(scope="module")
def hf_pipe():
    return HFTokenizerPipeline(max_tokens=64)


def test_hf_pipeline_test_time_matches_the_tokenizer(hf_pipe):
    assert default_hf_path().is_dir() and hf_pipe.vocab_size is None and hf_pipe.pad_id == 0
    caption = "A man playing a didgeridoo in the street."
    ids = hf_pipe.encode(caption)
    assert ids == hf_pipe.tokenizer(caption)["input_ids"]
    assert hf_pipe.tokens(caption)[:6] == ["[CLS]", "a", "man", "playing", "a", "did"]
    assert hf_pipe.word_pieces("didgeridoo !") == [ids[5:9], [999]]


def test_hf_pipeline_truncates_before_sep():
    pipe = HFTokenizerPipeline(max_tokens=6)
    ids = pipe.encode("one two three four five six seven")
    assert len(ids) == 6 and ids[0] == pipe.cls_id and ids[-1] == pipe.sep_id
    assert pipe.tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["one", "two", "three", "four"]


def test_hf_augmentation_treats_a_word_as_one(hf_pipe):
    pieces = hf_pipe.word_pieces("didgeridoo")[0]
    assert len(pieces) == 4
    outcomes = set()
    for seed in range(1500):
        out = hf_pipe.encode("didgeridoo", np.random.default_rng(seed))
        assert out[0] == hf_pipe.cls_id and out[-1] == hf_pipe.sep_id
        body = out[1:-1]
        if body == pieces:
            outcomes.add("kept")
        elif body == [hf_pipe.mask_id] * 4:
            outcomes.add("masked")
        elif body == []:
            outcomes.add("deleted")
        else:
            assert len(body) == 4 and hf_pipe.mask_id not in body
            outcomes.add("random")
    assert outcomes == {"kept", "masked", "deleted", "random"}


def test_build_text_pipeline_sources(tmp_path, small_vocab):
    captions = ["a red ball", "a red cup", "the red ball"]
    built = build_text_pipeline(TextConfig(kind="bigru", vocab_threshold=2), captions, None)
    assert built.vocab.idx2word[4:] == ["a", "red", "ball"]
    small_vocab.to_json(tmp_path / "vocab.json")
    from_dir = build_text_pipeline(TextConfig(kind="bigru"), captions, tmp_path)
    assert from_dir.vocab.idx2word == small_vocab.idx2word
    from_path = build_text_pipeline(TextConfig(kind="bigru", vocab_path=str(tmp_path / "vocab.json")), None, None)
    assert from_path.vocab_size == len(small_vocab) + 1
    assert isinstance(build_text_pipeline(TextConfig(kind="hf", max_tokens=16), None, None), HFTokenizerPipeline)
    with pytest.raises(ValueError, match="kind"):
        build_text_pipeline(TextConfig(kind="lstm"), captions, None)
    with pytest.raises(ValueError, match="train_captions"):
        build_text_pipeline(TextConfig(kind="bigru"), [], None)


# --- real caption files ---------------------------------------------------------------------
def _real(name: str) -> Path:
    path = scan_text_dir() / name
    if not path.is_file():
        pytest.skip(f"real SCAN file {path} absent (set ITMKIT_SCAN_TEXT)")
    return path


def test_real_f30k_test_captions_encode(hf_pipe):
    vocab = Vocabulary.from_json(_real("vocab/f30k_precomp_vocab.json"))
    captions = read_captions(_real("f30k_precomp/test_caps.txt"))
    pipe = WordIdPipeline(vocab)
    encoded = [pipe.encode(c) for c in captions]
    assert all(e[0] == Vocabulary.START and e[-1] == Vocabulary.END and len(e) >= 3 for e in encoded)
    n_tokens = sum(len(e) - 2 for e in encoded)
    n_unknown = sum(e.count(Vocabulary.UNK) for e in encoded)
    assert n_unknown / n_tokens < 0.01  # the test split's words are nearly all in the train vocabulary
    hf = [hf_pipe.encode(c) for c in captions[:500]]
    assert all(h[0] == hf_pipe.cls_id and h[-1] == hf_pipe.sep_id and len(h) <= 64 for h in hf)
    unk = hf_pipe.tokenizer.unk_token_id
    assert sum(h.count(unk) for h in hf) / sum(len(h) for h in hf) < 0.01


def _hf_folder_copy(tmp_path, names):
    """A folder holding only ``names`` from the offline MiniLM (symlinks: no 90 MB copies)."""
    folder = tmp_path / "hf_model"
    folder.mkdir()
    for name in names:
        (folder / name).symlink_to(default_hf_path() / name)
    return folder


@pytest.mark.parametrize("names, field, missing", [
    ([], "config.json", "no config.json"),
    (["config.json"], "tokenizer", "none"),
    (["config.json", "tokenizer.json", "tokenizer_config.json"], "weights", "none"),
])  # fmt: skip
def test_incomplete_hf_folders_are_named_with_what_is_missing(tmp_path, names, field, missing):
    from itmkit.data.errors import DataFormatError
    from itmkit.data.text import check_hf_folder

    folder = _hf_folder_copy(tmp_path, names)
    with pytest.raises(DataFormatError) as caught:
        check_hf_folder(folder, weights=True)
    message = str(caught.value)
    assert message.startswith(f"{folder}: {field}: expected ") and missing in message
    assert "save_pretrained" in message and "huggingface-cli download" in message  # what to do
    if field == "weights":  # the tokenizer alone needs no weights
        assert HFTokenizerPipeline(folder).encode("a dog")[0] == HFTokenizerPipeline().cls_id
    else:
        with pytest.raises(DataFormatError, match=str(folder)):
            HFTokenizerPipeline(folder)


def test_hf_text_encoder_names_the_folder_without_weights(tmp_path):
    from itmkit.data.errors import DataFormatError
    from itmkit.models.text_encoders import HFTextEncoder

    folder = _hf_folder_copy(tmp_path, ["config.json", "tokenizer.json"])
    with pytest.raises(DataFormatError, match=rf"{folder}: weights: expected model.safetensors or pytorch_model.bin"):
        HFTextEncoder(str(folder), embed_size=8)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataFormatError, match=rf"{folder}: model: expected .*found \w+Error"):
        HFTextEncoder(str(folder), embed_size=8)
