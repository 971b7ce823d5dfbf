"""Saved similarity matrices, the input of ensembles (baselines.md §C.3).

itmkit writes ``sims.npy`` as a plain float32 ``[n_img, n_cap]`` array: it memory-maps, loads
without pickle, and its row count is the references' ``npts``. The references' own files
(``np.save(path, {"npts": n_img, "sims": S})``, a pickled dict) are read too, but only with
``allow_pickle=True``, because unpickling a file can run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from itmkit.data.errors import DataFormatError
from itmkit.evaluate.atomic_write import save_npy
from itmkit.evaluate.metrics import as_score_array


SIMS_FILE = "a .npy similarity matrix [n_img, n_cap] of numbers (as `itmkit eval` writes sims.npy)"


def save_similarity(path, sims) -> Path:
    """Write ``sims [n_img, n_cap]`` as a float32 ``.npy`` (float64 stays float64: a float64
    evaluation's matrix keeps its precision), atomically. Returns the path."""
    S = as_score_array(sims)
    save_npy(path, S.astype(np.float64 if S.dtype == np.float64 else np.float32, copy=False))
    return Path(path)


def load_similarity(path, allow_pickle: bool = False, mmap: bool = True) -> np.ndarray:
    """``[n_img, n_cap]`` float array from an itmkit ``sims.npy`` or a reference ``{"npts", "sims"}`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: similarity file not found")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
            _, _, dtype = read_header(handle)
    except (ValueError, OSError, EOFError) as err:  # not a .npy file, or its header is cut
        raise DataFormatError(path, "header", SIMS_FILE, f"no readable .npy header ({type(err).__name__}: {err})") from None
    pickled = dtype.hasobject
    if pickled and not allow_pickle:
        raise ValueError(
            f"{path}: field 'sims': expected a plain float array, found a pickled object "
            "(the references' {'npts', 'sims'} dict); load it with allow_pickle=True "
            "(CLI: --allow-pickle) if you trust the file"
        )
    if not pickled and dtype.kind not in "fiu":
        raise DataFormatError(path, "dtype", SIMS_FILE, str(dtype))
    try:
        data = np.load(path, mmap_mode="r" if mmap and not pickled else None, allow_pickle=allow_pickle)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as err:  # e.g. fewer bytes than the header says
        raise DataFormatError(path, "data", SIMS_FILE, f"an unreadable array ({type(err).__name__}: {err})") from None
    if isinstance(data, np.ndarray) and data.dtype == object:
        data = data.item() if data.ndim == 0 else data
    if isinstance(data, dict):
        if "sims" not in data:
            raise ValueError(f"{path}: field 'sims': expected a key 'sims', found keys {sorted(data)}")
        sims = np.asarray(data["sims"])
        npts = data.get("npts", sims.shape[0])
        if sims.ndim != 2 or sims.shape[0] != int(npts):
            raise ValueError(f"{path}: field 'npts': expected the row count of sims {sims.shape}, found {npts}")
        return sims
    if not isinstance(data, np.ndarray) or data.ndim != 2:
        shape = getattr(data, "shape", type(data).__name__)
        raise ValueError(f"{path}: field 'sims': expected a 2-D [n_img, n_cap] array, found {shape}")
    return data
