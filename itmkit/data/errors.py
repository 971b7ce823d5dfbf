"""The one error every data reader raises on malformed input.

A reader that meets a bad file says which file, which field, what it expected and what it found,
so a user can fix the data without reading the reader (baselines.md §A.1 "reading rules").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DataFormatError(ValueError):
    """A data file does not have the layout itmkit expects.

    Attributes:
        path: the offending file (or folder).
        field: what part of it is wrong (``"line 17"``, ``"shape"``, ``"word2idx"``, ...).
        expected: what the reader expected, in words.
        found: what it found instead.
    """

    def __init__(self, path: str | Path, field: str, expected: Any, found: Any) -> None:
        self.path = Path(path)
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(f"{self.path}: {field}: expected {expected}, found {found}")

    def __reduce__(self):
        # DataLoader workers pickle exceptions back to the main process; keep all four fields.
        return (type(self), (self.path, self.field, self.expected, self.found))
