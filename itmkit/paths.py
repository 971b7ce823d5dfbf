"""Where itmkit looks for shared data and keeps its caches (all overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Cache root for built data sets (``ITMKIT_CACHE``, default ``~/.cache/itmkit``)."""
    path = Path(os.environ.get("ITMKIT_CACHE", Path.home() / ".cache" / "itmkit"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def scan_text_dir() -> Path:
    """Real SCAN caption/vocabulary files (``ITMKIT_SCAN_TEXT``, default ``../shared/data/scan_text``
    beside the repository). May not exist on a user's clone: callers check ``.is_dir()``."""
    return Path(os.environ.get("ITMKIT_SCAN_TEXT", REPO_ROOT.parent / "shared" / "data" / "scan_text"))


def method_specs_dir() -> Path:
    """The method specifications ``*.md`` (``ITMKIT_SPECS``, default ``../shared/methods`` beside the
    repository), the source text of ``reported_results.csv``. May not exist on a user's clone:
    callers check ``.is_dir()``."""
    return Path(os.environ.get("ITMKIT_SPECS", REPO_ROOT.parent / "shared" / "methods"))
