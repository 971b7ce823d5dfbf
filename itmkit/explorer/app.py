"""The explorer as ipywidgets: pick a run and a split, type a caption, pick an image, compare runs.

:func:`explorer_app` builds the widget tree; :class:`ExplorerApp` holds it and the callbacks,
which are plain methods (``search``, ``show_image``, ``select_run``, ``select_compare``) so tests
drive them without a browser and read what they produced (``last_query``, ``last_captions``,
``comparison``). The rankings are drawn as image widgets (CSS class ``itmkit-ranked``, one
``itmkit-thumb`` per picture), the alignment as a matplotlib figure in an output area; the static
views of :mod:`itmkit.explorer.views` show the same things where no kernel runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from itmkit.evaluate.retrieval import TopK
from itmkit.explorer.catalog import RunEntry, find_runs
from itmkit.explorer.session import ExplorerSession, TextQuery
from itmkit.explorer.views import alignment_view, caption_ranking_table, compare_image_rankings, thumbnail_png

NO_COMPARISON = "(none)"


class ExplorerApp:
    """Widgets and callbacks of the explorer (see the module doc).

    Args:
        runs: the runs to offer (:func:`~itmkit.explorer.catalog.find_runs` entries), first selected.
        split: the split every run explores (one with pictures).
        k: how many images / captions a ranking shows.
        data_dir: the precomp folder, default each run's own data.
    """

    def __init__(self, runs: Sequence[RunEntry], split: str = "test", k: int = 5,
                 data_dir: str | Path | None = None) -> None:  # fmt: skip
        import ipywidgets as widgets

        if not runs:
            raise ValueError("explorer: expected at least one trained run, found none (train one, or point at a folder of runs)")
        self.runs = {entry.label: entry for entry in runs}
        self.split, self.k, self.data_dir = split, int(k), data_dir
        self._sessions: dict[Path, ExplorerSession] = {}
        self.last_query: TextQuery | None = None
        self.last_captions: TopK | None = None
        self.comparison: pd.DataFrame | None = None

        labels = list(self.runs)
        self.run_picker = widgets.Dropdown(options=labels, value=labels[0], description="run")
        self.compare_picker = widgets.Dropdown(options=[NO_COMPARISON, *labels], value=NO_COMPARISON, description="compare")
        self.caption = widgets.Text(placeholder="type a caption, press Enter", description="caption",
                                    continuous_update=False, layout=widgets.Layout(width="60%"))  # fmt: skip
        self.caption.add_class("itmkit-caption")
        self.image_picker = widgets.BoundedIntText(value=0, min=0, max=0, description="image")
        self.status = widgets.HTML()
        self.ranked = widgets.HBox()
        self.ranked.add_class("itmkit-ranked")
        self.alignment_out = widgets.Output()
        self.alignment_out.add_class("itmkit-alignment")
        self.status.add_class("itmkit-status")
        self.captions_out = widgets.Output()
        self.compare_out = widgets.Output()
        self.run_picker.observe(lambda change: self.select_run(change["new"]), names="value")
        self.compare_picker.observe(lambda change: self.select_compare(change["new"]), names="value")
        self.caption.observe(lambda change: self.search(change["new"]), names="value")
        self.image_picker.observe(lambda change: self.show_image(change["new"]), names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.run_picker, self.compare_picker]),
            self.caption, self.status, self.ranked, self.alignment_out, self.compare_out,
            self.image_picker, self.captions_out,
        ])  # fmt: skip
        self.select_run(labels[0])

    # --- state ---------------------------------------------------------------------------------
    def session(self, label: str) -> ExplorerSession:
        """The opened run ``label`` (opened and encoded once, then reused)."""
        entry = self.runs[label]
        if entry.path not in self._sessions:
            self._sessions[entry.path] = ExplorerSession(entry.path, self.split, self.data_dir)
        return self._sessions[entry.path]

    @property
    def current(self) -> ExplorerSession:
        return self.session(self.run_picker.value)

    # --- callbacks -----------------------------------------------------------------------------
    def select_run(self, label: str) -> None:
        """Open run ``label``; the image picker spans its split; an existing query is re-run."""
        session = self.session(label)
        self.image_picker.max = session.split.n_images - 1
        self.status.value = f"<b>{session.label}</b>: {session.split.n_images} {self.split} images"
        if self.caption.value.strip():
            self.search(self.caption.value)

    def select_compare(self, label: str) -> None:
        """Compare the current run with run ``label`` on the typed caption (side by side)."""
        self.comparison = None
        self.compare_out.clear_output()
        if label == NO_COMPARISON or not self.caption.value.strip():
            return
        sessions = [self.current, self.session(label)]
        self.comparison = compare_image_rankings(sessions, self.caption.value, self.k)
        with self.compare_out:
            from IPython.display import display

            display(self.comparison.round(3))

    def search(self, text: str) -> TextQuery | None:
        """A typed caption: its ``k`` best images as thumbnails, unknown words named, the
        alignment on the best image, and the comparison when a second run is picked."""
        import ipywidgets as widgets

        if not text.strip():
            return None
        session = self.current
        query = session.images_for_text(text, self.k)
        self.last_query = query
        thumbs = []
        for rank, (image, score) in enumerate(zip(query.found.indices[0], query.found.scores[0]), start=1):
            picture = widgets.Image(value=thumbnail_png(session.picture(int(image))), format="png")
            picture.add_class("itmkit-thumb")
            thumbs.append(widgets.VBox([picture, widgets.Label(f"#{rank} image {int(image)}  s={score:.3f}")]))
        self.ranked.children = thumbs
        note = f" — not in the vocabulary: <code>{', '.join(query.unknown)}</code>" if query.unknown else ""
        self.status.value = f"<b>{session.label}</b>: the {query.found.k} best of {session.split.n_images} images{note}"
        self.alignment_out.clear_output()
        figure = alignment_view(session, int(query.found.indices[0, 0]), text)
        with self.alignment_out:
            if figure is None:
                print(f"{session.method}: one vector per image and caption, no word-region alignment to draw")
            else:
                import matplotlib.pyplot as plt
                from IPython.display import display

                display(figure)
                plt.close(figure)
        if self.compare_picker.value != NO_COMPARISON:
            self.select_compare(self.compare_picker.value)
        return query

    def show_image(self, image: int) -> TopK:
        """An image: its ``k`` best captions, its own ones marked."""
        session = self.current
        found = session.captions_for_image(int(image), self.k)
        self.last_captions = found
        self.captions_out.clear_output()
        with self.captions_out:
            from IPython.display import display

            display(caption_ranking_table(session, found).round(3))
        return found


def explorer_app(runs: str | Path | Sequence[str | Path], split: str = "test", k: int = 5,
                 data_dir: str | Path | None = None) -> ExplorerApp:  # fmt: skip
    """The explorer over ``runs``: a folder searched for trained runs
    (:func:`~itmkit.explorer.catalog.find_runs`) or a list of run folders. Show ``app.widget``."""
    if isinstance(runs, (str, Path)):
        entries = [entry for entry in find_runs(runs) if entry.rsum is not None]
    else:
        entries = []
        for run in runs:
            found = find_runs(run)
            if not found:
                raise FileNotFoundError(f"{run}: expected a trained run (config.json beside model_best.pt), found none")
            entries.append(found[0])
    return ExplorerApp(entries, split, k, data_dir)
