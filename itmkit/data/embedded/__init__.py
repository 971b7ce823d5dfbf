"""The embedded data set: procedural scenes, captions and CNN region features in SCAN precomp layout.

``embedded_dataset("tiny")`` builds (seconds) or reuses a cached precomp folder that every reader in
the kit opens like real Flickr30K/COCO data; see ``docs/embedded_data.md``.
Modules: ``scenes`` (scene graphs, hard-negative partners), ``render`` (pixels, region boxes),
``captions`` (the caption grammar), ``build`` (presets, the build, the cache).
"""

from itmkit.data.embedded.build import (
    PRESETS,
    EmbeddedPreset,
    build_embedded,
    embedded_dataset,
    embedded_feature_dim,
    folder_name,
    is_complete,
)

__all__ = ["PRESETS", "EmbeddedPreset", "build_embedded", "embedded_dataset", "embedded_feature_dim", "folder_name", "is_complete"]
