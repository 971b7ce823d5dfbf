"""Figures for the notebooks, grouped by what they show (not by the method that first needed them).

- :mod:`~itmkit.figures.curves`: charts of numbers: training curves, recall bars and tables,
  similarity matrices, rank histograms, caption lengths;
- :mod:`~itmkit.figures.images`: pictures of images: region boxes, image grids, retrieval rows
  (drawn from :mod:`itmkit.evaluate.retrieval`);
- :mod:`~itmkit.figures.alignment`: word-region weights of any method's explanation drawn on the
  image (one set of functions for SCAN, CHAN, SGRAF, ESL, ...);
- :mod:`~itmkit.figures.graphs`: similarity graphs of one pair: similarity vectors, graph edges,
  attention filtration;
- :mod:`~itmkit.figures.noise`: studies over seeds: spread per method, paired differences, rank
  flips, hard-negative scores per swap kind;
- :mod:`~itmkit.figures.prototypes`: clustering prototypes (who shares one, soft assignments) and
  fusion gates of an embedding model (AAHR).

Every function returns a :class:`matplotlib.figure.Figure` (or the axes it drew on); notebooks
save it to ``out_dir`` and show it. Adding a figure: put it in the module of what it shows, take
data (a table, a :class:`~itmkit.evaluate.retrieval.TopK`, an
:class:`~itmkit.models.base.Explanation`), never a model, and test it in
``tests/test_figures_<module>.py``.
"""

from itmkit.figures import alignment, curves, graphs, images, noise, prototypes

__all__ = ["alignment", "curves", "graphs", "images", "noise", "prototypes"]
