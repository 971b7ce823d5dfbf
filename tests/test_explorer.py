"""The explorer without a browser: catalog, session answers, static views and widget callbacks,
on real runs trained on the embedded ``tiny`` set (one VSE∞, one SCAN)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("ipywidgets", reason="the course extra (ipywidgets) is not installed")

from itmkit.config import replace_nested  # noqa: E402
from itmkit.methods.registry import get_method  # noqa: E402


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    from itmkit.train.trainer import train

    root = tmp_path_factory.mktemp("explorer_runs")
    for method in ("vse_infty", "scan"):
        cfg = replace_nested(get_method(method).preset("smoke"), {"train.epochs": 1})
        train(cfg, root / method, progress=False)
    return root


@pytest.fixture(scope="module")
def sessions(runs_root):
    from itmkit.explorer import ExplorerSession

    return {m: ExplorerSession(runs_root / m) for m in ("vse_infty", "scan")}


def test_find_runs_lists_finished_runs_with_method_preset_and_rsum(runs_root, tmp_path):
    from itmkit.explorer.catalog import find_runs

    found = find_runs(runs_root)
    assert [(e.path.name, e.method, e.preset) for e in found] == [("scan", "scan", "smoke"), ("vse_infty", "vse_infty", "smoke")]
    for entry in found:
        stored = json.loads((entry.path / "result.json").read_text())["test"]["test/rsum"]
        assert entry.rsum == pytest.approx(stored)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")  # no checkpoint: not a run
    assert find_runs(tmp_path) == []
    shutil.copytree(runs_root / "scan", tmp_path / "broken")
    config = json.loads((tmp_path / "broken" / "config.json").read_text())
    config["method"] = 3
    (tmp_path / "broken" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"broken/config.json: field 'method': expected a method name, found 3"):
        find_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected a folder holding trained runs"):
        find_runs(tmp_path / "nowhere")


def test_splits_with_pictures_needs_every_picture(sessions, tmp_path):
    from itmkit.explorer.catalog import splits_with_pictures

    root = sessions["scan"].data_dir
    assert "test" in splits_with_pictures(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    ids = [line for line in (copy / "test_ids.txt").read_text().split()]
    victim = next((copy / "images").glob(f"{ids[3]}.*"))
    victim.unlink()
    assert "test" not in splits_with_pictures(copy)


@pytest.mark.parametrize("method", ["vse_infty", "scan"])
def test_typed_caption_ranks_as_the_evaluation_scores_that_caption(sessions, method):
    session = sessions[method]
    caption = 7
    query = session.images_for_text(session.split.captions[caption], k=5)
    column = session.sims[:, caption]  # the evaluation's own scores of that caption
    order = np.argsort(-column, kind="stable")[:5]
    np.testing.assert_allclose(query.found.scores[0], column[order], atol=1e-5)
    assert query.unknown == []


def test_unknown_words_are_named_not_dropped(sessions):
    query = sessions["scan"].images_for_text("a zzqx circle", k=3)
    assert query.unknown == ["zzqx"]
    assert "zzqx" in query.tokens and query.found.k == 3
    with pytest.raises(ValueError, match="empty caption"):
        sessions["scan"].images_for_text("   ")


def test_captions_of_an_image_mark_its_own(sessions):
    session = sessions["vse_infty"]
    found = session.captions_for_image(2, k=10)
    row = session.sims[2]
    assert found.queries.tolist() == [2]
    np.testing.assert_allclose(found.scores[0], np.sort(row)[::-1][:10], atol=1e-6)
    own = set(range(10, 15))  # image 2 owns captions 10..14
    assert [int(c) in own for c in found.indices[0]] == found.is_match[0].tolist()


def test_alignment_only_for_methods_with_word_region_weights(sessions):
    scan = sessions["scan"]
    text = scan.split.captions[4]
    explanation = scan.alignment(0, text)
    weights = np.asarray(explanation["word_region_weights"])
    assert weights.shape == (len(scan.pipeline.tokens(text)), scan.split.n_regions)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
    assert sessions["vse_infty"].alignment(0, text) is None


def test_static_views(sessions):
    import matplotlib.pyplot as plt

    from itmkit.explorer import views

    scan, vse = sessions["scan"], sessions["vse_infty"]
    query = scan.images_for_text("a red circle", k=4)
    table = views.image_ranking_table(scan, query)
    assert table["rank"].tolist() == [1, 2, 3, 4] and table["image"].tolist() == query.found.indices[0].tolist()
    fig = views.ranked_images_figure(scan, query)
    assert len(fig.axes) == 5  # the text panel and four pictures
    plt.close(fig)
    fig = views.alignment_view(scan, int(query.found.indices[0, 0]), "a red circle")
    assert fig is not None and len([ax for ax in fig.axes if ax.images]) == len(scan.pipeline.tokens("a red circle"))
    plt.close(fig)
    assert views.alignment_view(vse, 0, "a red circle") is None
    captions = views.caption_ranking_table(vse, vse.captions_for_image(1, k=5))
    assert captions["text"].tolist() == [vse.split.captions[c] for c in captions["caption"]]
    side = views.compare_image_rankings([scan, vse], "a red circle", k=3)
    assert side[f"{vse.label}: image"].tolist() == vse.images_for_text("a red circle", 3).found.indices[0].tolist()
    assert side[f"{scan.label}: image"].tolist() == query.found.indices[0][:3].tolist()
    png = views.thumbnail_png(scan.picture(0), size=32)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_app_callbacks(runs_root, sessions):
    from itmkit.explorer import explorer_app

    app = explorer_app(runs_root, k=5)
    assert list(app.runs) == [e for e in app.run_picker.options]
    scan_label = next(label for label in app.runs if label.startswith("scan"))
    vse_label = next(label for label in app.runs if label.startswith("vse_infty"))
    app.run_picker.value = scan_label
    app.caption.value = "a red circle"  # the widget's own event path
    assert app.last_query is not None and app.last_query.text == "a red circle"
    assert len(app.ranked.children) == 5
    assert app.last_query.found.indices[0].tolist() == sessions["scan"].images_for_text("a red circle", 5).found.indices[0].tolist()
    app.image_picker.value = 3
    assert app.last_captions.queries.tolist() == [3]
    app.compare_picker.value = vse_label
    assert app.comparison is not None and f"{vse_label.split(' (')[0]}" in " ".join(app.comparison.columns)
    app.run_picker.value = vse_label  # switching runs re-runs the query on the other model
    assert app.last_query.found.indices[0].tolist() == sessions["vse_infty"].images_for_text("a red circle", 5).found.indices[0].tolist()
    assert app.image_picker.max == sessions["vse_infty"].split.n_images - 1
    with pytest.raises(FileNotFoundError, match="nothing: expected a folder holding trained runs"):
        explorer_app([runs_root / "nothing"])
    (runs_root / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: expected a trained run \(config.json beside model_best.pt\)"):
        explorer_app([runs_root / "empty"])
    with pytest.raises(ValueError, match="expected at least one trained run"):
        explorer_app(runs_root / "empty")
