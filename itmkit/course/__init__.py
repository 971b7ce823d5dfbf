"""The course: numbered notebooks run headless, and the names a notebook imports.

- :mod:`itmkit.course.runner`: the papermill runner (``python -m itmkit.course list | run``),
  notebook discovery and the summary table (:func:`~itmkit.course.runner.run_course`);
- :mod:`itmkit.course.notebook`: what a notebook calls to turn its parameters into runs and its
  results into ``metrics.json`` (``notebook_run_config``, ``comparison_run``, ``write_metrics``, ...).

A notebook's imports come from here, in the spirit of ``d2l``: one line such as
``from itmkit.course import PrecompSplit, figures, notebook_run_config, train, write_metrics``
gives it the names it needs. Each name is the package's own object, taken from the module that
does the work, as :data:`NOTEBOOK_NAMES` lists (``help(itmkit.course)`` shows it too); they load on
first use, so ``python -m itmkit.course list`` stays light. A cell that teaches one specific
piece (a method's helper, the embedded set's renderer) imports it from its own module, where it is
used.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it. Adding a name: one line here (tests/test_course.py checks
# that each resolves to its module's own object).
NOTEBOOK_NAMES: dict[str, str] = {
    # the course's own helpers
    "prepare_out_dir": "itmkit.course.notebook",
    "embedded_preset_for": "itmkit.course.notebook",
    "notebook_run_config": "itmkit.course.notebook",
    "comparison_run": "itmkit.course.notebook",
    "shared_runs_dir": "itmkit.course.notebook",
    "write_metrics": "itmkit.course.notebook",
    "run_course": "itmkit.course.runner",
    # set-up and configuration
    "seed_everything": "itmkit.runtime",
    "configure_threads": "itmkit.runtime",
    "pick_device": "itmkit.runtime",
    "replace_nested": "itmkit.config",
    "get_method": "itmkit.methods.registry",
    # data
    "embedded_dataset": "itmkit.data.embedded",
    "PrecompSplit": "itmkit.data.precomp",
    "verify_precomp": "itmkit.data.precomp",
    "build_text_pipeline": "itmkit.data.text",
    "load_rgb_image": "itmkit.data.region_features",
    # training and evaluation
    "train": "itmkit.train.trainer",
    "resolve_data_dir": "itmkit.train.trainer",
    "encode_split": "itmkit.evaluate.evaluator",
    "evaluate_model": "itmkit.evaluate.evaluator",
    "similarity_matrix": "itmkit.evaluate.evaluator",
    "recall_metrics": "itmkit.evaluate.metrics",
    "default_protocols": "itmkit.evaluate.protocols",
    "summary_rows": "itmkit.evaluate.protocols",
    "evaluate_ensemble": "itmkit.evaluate.ensemble",
    "explain_pair": "itmkit.evaluate.explain",
    "word_parts_of_matching_pairs": "itmkit.evaluate.explain",
    "mean_by_word": "itmkit.evaluate.explain",
    "GLOBAL_NODE": "itmkit.evaluate.explain",
    "images_for_captions": "itmkit.evaluate.retrieval",
    "captions_for_images": "itmkit.evaluate.retrieval",
    "compare_with_reported": "itmkit.reported",
    "reported_results": "itmkit.reported",
    # GPU training and scale (notebook 12)
    "torchrun_train": "itmkit.train.launch",
    "measure_throughput": "itmkit.train.throughput",
    "weight_difference": "itmkit.train.checkpoint",
    "load_checkpoint": "itmkit.train.checkpoint",
    "hardest_negatives_by_batch_size": "itmkit.evaluate.batch_negatives",
    # figures, by what they show: figures.curves, figures.images, figures.alignment, figures.graphs
    "figures": "itmkit.figures",
    # the interactive explorer (ipywidgets) and its static views
    "explorer_app": "itmkit.explorer.app",
    "ExplorerSession": "itmkit.explorer.session",
}


def __getattr__(name: str) -> Any:
    if name not in NOTEBOOK_NAMES:
        raise AttributeError(
            f"module 'itmkit.course' has no attribute {name!r}; notebook names: {sorted(NOTEBOOK_NAMES)}"
        )
    module = importlib.import_module(NOTEBOOK_NAMES[name])
    value = module if module.__name__.rpartition(".")[2] == name else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(NOTEBOOK_NAMES))


__all__ = sorted(NOTEBOOK_NAMES)
__doc__ += "\nNotebook names and where they come from:\n\n" + "\n".join(
    f"- ``{name}``: ``{module}``" for name, module in NOTEBOOK_NAMES.items()
)
