"""AMR (Abstract Meaning Representation) text for CEFG's gated fusion (cefg.md §3.5) [itmkit design].

The reference parses every caption offline with HanLP's AMR parser and reads one line per caption
from ``{split}_amr_caps.txt`` (then never uses it, §8.3). itmkit's optional gated fusion reads the
same file: line ``k`` is caption ``k``'s AMR graph, linearised as text (e.g. SPRING-style
``( walk-01 :ARG0 ( dog ) )``). The tokens are mapped with the *caption* pipeline (SCAN
vocabulary, unknown words -> ``<unk>``). Nothing is parsed here: the file must come from the
offline step documented in ``docs/cefg.md``.

:class:`AMRTextPipeline` hands a model both sequences through the ordinary loaders: a caption
encodes as ``[<start> AMR ids <end>] + [<start> caption ids <end>]``, AMR first so that
training-time caption augmentation (which may delete or mask ``<end>``) never moves the boundary:
the first ``<end>`` closes the AMR part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from itmkit.data.errors import DataFormatError
from itmkit.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit, read_captions
from itmkit.data.vocab import Vocabulary

AMR_FILE = "{split}_amr_caps.txt"  # the reference loader's name (data.py)


def read_amr_lines(split: PrecompSplit) -> list[str]:
    """The AMR lines of ``split``'s captions (the view's rows of ``{split}_amr_caps.txt``).

    Raises :class:`DataFormatError` when the file is missing (with what to do), has another line
    count than ``{split}_caps.txt``, or an empty line."""
    path = Path(split.root) / AMR_FILE.format(split=split.split)
    if not path.is_file():
        raise DataFormatError(
            path, "file",
            "one linearised AMR graph per caption line (CEFG amr_fusion='gated' reads it; parse the captions "
            "offline as docs/cefg.md describes, or use amr_fusion='none', the released behaviour)",
            "no such file",
        )
    lines = read_captions(path)
    n_file_captions = len(read_captions(Path(split.root) / f"{split.split}_caps.txt"))
    if len(lines) != n_file_captions:
        raise DataFormatError(path, "line count", f"{n_file_captions} (one per line of {split.split}_caps.txt)", f"{len(lines)} lines")
    first, stop = split.image_range
    return lines[first * CAPTIONS_PER_IMAGE : stop * CAPTIONS_PER_IMAGE]


class AMRTextPipeline:
    """A caption pipeline that prefixes every caption's ids with its AMR's ids (see the module doc).

    Args:
        base: the caption pipeline (its vocabulary maps the AMR tokens too).
        captions, amr_lines: aligned lists (a split's captions and :func:`read_amr_lines`).
        source: named in errors (the AMR file).
    """

    def __init__(self, base, captions: list[str], amr_lines: list[str], source: str | Path = AMR_FILE) -> None:
        if isinstance(base, AMRTextPipeline):
            base = base.base
        if len(captions) != len(amr_lines):
            raise ValueError(f"AMRTextPipeline: expected one AMR line per caption ({len(captions)}), found {len(amr_lines)}")
        self.base = base
        self.vocab_size = base.vocab_size
        self.pad_id = base.pad_id
        self.amr_of: dict[str, str] = {}
        for line, (caption, amr) in enumerate(zip(captions, amr_lines), start=1):
            known = self.amr_of.setdefault(caption, amr)
            if known != amr:  # the same caption text parsed to two graphs: which one is meant?
                raise DataFormatError(source, f"line {line}", f"the AMR given earlier for the caption {caption!r}", repr(amr))

    @classmethod
    def for_split(cls, base, split: PrecompSplit) -> "AMRTextPipeline":
        return cls(base, split.captions, read_amr_lines(split), Path(split.root) / AMR_FILE.format(split=split.split))

    def amr(self, caption: str) -> str:
        try:
            return self.amr_of[caption]
        except KeyError:
            raise KeyError(f"AMRTextPipeline: no AMR line for the caption {caption!r} (not in this split)") from None

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        """``[<start> AMR <end>] + base.encode(caption, rng)`` (the AMR part is never augmented)."""
        return self.base.encode(self.amr(caption)) + self.base.encode(caption, rng)

    def tokens(self, caption: str) -> list[str]:
        """The caption's own tokens (what the model's word positions are)."""
        return self.base.tokens(caption)

    def __repr__(self) -> str:
        return f"AMRTextPipeline({self.base!r}, {len(self.amr_of)} captions)"


def split_amr_tokens(tokens: Tensor, lengths: Tensor, end_id: int = Vocabulary.END) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Undo :meth:`AMRTextPipeline.encode` on a padded batch.

    ``tokens [B, L]`` long, ``lengths [B]`` -> ``(amr [B, La], amr_lengths [B], caption [B, Lc],
    caption_lengths [B])`` (torch tensors, 0-padded); the AMR part ends at each row's first
    ``end_id``. Raises ``ValueError`` when a row has no AMR part followed by a caption.
    """
    B, L = tokens.shape
    positions = torch.arange(L, device=tokens.device)[None].expand(B, L)
    is_end = (tokens == end_id) & (positions < lengths[:, None])
    has_end = is_end.any(1)
    amr_lengths = torch.where(has_end, is_end.int().argmax(1) + 1, lengths)
    caption_lengths = lengths - amr_lengths
    if not bool(has_end.all()) or int(caption_lengths.min()) < 1:
        row = int(torch.nonzero(~has_end | (caption_lengths < 1))[0])
        raise ValueError(
            f"CEFG amr_fusion='gated' tokens: expected [<start> AMR <end>] followed by the caption's ids in every "
            f"row (AMRTextPipeline; the model's prepare_data sets it up), found row {row} = {tokens[row, : int(lengths[row])].tolist()}"
        )
    La, Lc = int(amr_lengths.max()), int(caption_lengths.max())
    amr = tokens[:, :La].masked_fill(positions[:, :La] >= amr_lengths[:, None], 0)
    index = (amr_lengths[:, None] + torch.arange(Lc, device=tokens.device)[None]).clamp(max=L - 1)
    caption = torch.gather(tokens, 1, index).masked_fill(positions[:, :Lc] >= caption_lengths[:, None], 0)
    return amr, amr_lengths, caption, caption_lengths
