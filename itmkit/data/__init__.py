"""Data layer: precomp readers, vocabulary, text pipelines, loaders (baselines.md §A).

Nothing here imports a model. The embedded course data set lives in ``itmkit.data.embedded``,
the region feature extractor in ``itmkit.data.region_features``; the Karpathy JSON and BUTD TSV
converters (``itmkit.data.karpathy``, ``itmkit.data.butd_tsv``) back the ``data_prep/`` commands.
"""

from itmkit.data.errors import DataFormatError
from itmkit.data.loaders import (
    Batch,
    PairDataset,
    caption_batches,
    collate_pairs,
    image_batches,
    steps_per_epoch,
    train_batches,
)
from itmkit.data.precomp import PrecompSplit, list_splits, read_captions, verify_precomp
from itmkit.data.text import (
    HFTokenizerPipeline,
    TextPipeline,
    WordIdPipeline,
    build_text_pipeline,
    default_hf_path,
)
from itmkit.data.tokenize import word_tokenize
from itmkit.data.vocab import Vocabulary

__all__ = [
    "Batch",
    "DataFormatError",
    "HFTokenizerPipeline",
    "PairDataset",
    "PrecompSplit",
    "TextPipeline",
    "Vocabulary",
    "WordIdPipeline",
    "build_text_pipeline",
    "caption_batches",
    "collate_pairs",
    "default_hf_path",
    "image_batches",
    "list_splits",
    "read_captions",
    "steps_per_epoch",
    "train_batches",
    "verify_precomp",
    "word_tokenize",
]
