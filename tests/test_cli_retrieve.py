"""``itmkit retrieve``: the listing of a trained run's split equals the retrieval data of the run's
own test similarity matrix, and bad queries are one-line errors."""

import numpy as np
import pytest

from itmkit.cli import main
from itmkit.evaluate.retrieval import captions_for_images, images_for_captions
from itmkit.evaluate.synthetic_precomp import write_synthetic_precomp

TINY = ["--set", "model.img_dim=8", "--set", "model.embed_size=16", "--set", "text.word_dim=8",
        "--set", "train.epochs=1", "--set", "train.batch_size=32", "--device", "cpu", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = write_synthetic_precomp(tmp_path_factory.mktemp("precomp"), {"train": 20, "dev": 10, "test": 10})
    out = tmp_path_factory.mktemp("run")
    args = ["train", "--method", "vse_infty", "--preset", "smoke", "--data", str(data), "--out", str(out), *TINY]
    assert main(args) == 0
    return out, np.load(out / "test" / "sims.npy")


def listed(text: str, column: str) -> list[int]:
    """The values of ``column`` in a printed table (header on the second line)."""
    lines = text.strip().splitlines()[1:]
    at = lines[0].split().index(column)
    return [int(line.split()[at]) for line in lines[1:]]


def test_caption_and_image_queries_list_what_the_retrieval_data_says(run, capsys):
    out, sims = run
    assert main(["retrieve", str(out), "--caption", "12", "-k", "4", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    found = images_for_captions(sims, [12], k=4)
    assert listed(printed, "image") == found.indices[0].tolist()
    assert f"its image 2 ranks #{found.match_rank[0] + 1} of 10" in printed.splitlines()[0]
    assert main(["retrieve", str(out), "--image", "3", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert listed(printed, "caption") == captions_for_images(sims, [3], k=5).indices[0].tolist()


def test_text_query_ranks_every_image(run, capsys):
    out, _ = run
    assert main(["retrieve", str(out), "--text", "a red circle", "-k", "10", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("text 'a red circle': the 10 best of 10 test images")
    assert sorted(listed(printed, "image")) == list(range(10))


def test_bad_queries_are_one_line_errors(run, capsys):
    out, _ = run
    assert main(["retrieve", str(out), "--caption", "50", "--device", "cpu", "--quiet"]) == 1
    assert "caption 50: expected an index in [0, 50)" in capsys.readouterr().err
    assert main(["retrieve", str(out), "--image", "1", "-k", "0", "--device", "cpu", "--quiet"]) == 1
    assert "k >= 1" in capsys.readouterr().err
