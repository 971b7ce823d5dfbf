"""The text pipeline of a run as plain data, stored in checkpoints so a checkpoint evaluates alone.

A BiGRU run stores its whole vocabulary (SCAN's JSON layout, §A.2), so evaluation never
rebuilds it from captions; a Hugging Face run stores the tokenizer folder it used
(``None`` = the offline MiniLM of this installation).
"""

from __future__ import annotations

from typing import Any

from itmkit.data.text import HFTokenizerPipeline, WordIdPipeline
from itmkit.data.vocab import Vocabulary


def describe_pipeline(pipeline, hf_path: str | None = None) -> dict[str, Any]:
    """``{"kind": "word_ids", "vocab": {...}}`` or ``{"kind": "hf", "path": ..., "max_tokens": n}``."""
    if isinstance(pipeline, WordIdPipeline):
        return {"kind": "word_ids", "vocab": pipeline.vocab.to_dict()}
    if isinstance(pipeline, HFTokenizerPipeline):
        # keep the config's path (None -> this machine's MiniLM) rather than a resolved site-packages path
        return {"kind": "hf", "path": hf_path, "max_tokens": pipeline.max_tokens}
    raise TypeError(f"describe_pipeline: expected WordIdPipeline or HFTokenizerPipeline, found {type(pipeline).__name__}")


def pipeline_from_description(description: dict[str, Any], source: str = "<checkpoint>"):
    """Rebuild the pipeline :func:`describe_pipeline` described (``source`` names the file in errors)."""
    kind = description.get("kind") if isinstance(description, dict) else None
    if kind == "word_ids":
        return WordIdPipeline(Vocabulary.from_dict(description["vocab"], path=f"{source} [text_pipeline.vocab]"))
    if kind == "hf":
        return HFTokenizerPipeline(description.get("path"), max_tokens=int(description.get("max_tokens", 64)))
    raise ValueError(f"{source}: field 'text_pipeline.kind': expected 'word_ids' or 'hf', found {kind!r}")
