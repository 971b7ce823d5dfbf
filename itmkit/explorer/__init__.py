"""The interactive explorer: trained runs, their rankings and alignments, as widgets and static views.

- :mod:`itmkit.explorer.catalog`: the runs under a folder, the splits with pictures;
- :mod:`itmkit.explorer.session`: one run on one split (typed caption -> images, image -> captions,
  word -> region alignment);
- :mod:`itmkit.explorer.views`: tables and static figures of each view;
- :mod:`itmkit.explorer.app`: the ipywidgets app (:func:`explorer_app`) on top of them.
"""

from itmkit.explorer.app import ExplorerApp, explorer_app
from itmkit.explorer.catalog import find_runs, splits_with_pictures
from itmkit.explorer.session import ExplorerSession

__all__ = ["ExplorerApp", "ExplorerSession", "explorer_app", "find_runs", "splits_with_pictures"]
