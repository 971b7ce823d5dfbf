"""CEFG's region adjacency beside the features: {split}_ims_dir_selfadj4.npy (cefg.md §3.4).

    python data_prep/cefg_adjacency.py data/f30k_precomp                    # every split with boxes
    python data_prep/cefg_adjacency.py data/f30k_precomp --allow-pickle     # the reference's size dicts
    python data_prep/cefg_adjacency.py data/coco_precomp --rule all_sectors --splits train dev test

The reference's adj.py, one file per split, with the same rule and the same output name (so its
own output files work with itmkit as they are). Boxes (pixels, x1 y1 x2 y2, one [K, 4] per row of
{split}_ims.npy): {split}_ims_bbx.npy, the reference's input, or {split}_boxes.npy as written by
butd_tsv_to_precomp.py. Image sizes: {split}_ims_size.npy ([n, 2] width, height; the reference's
array of {"image_w", "image_h"} dicts needs --allow-pickle: only for files you trust), the
folder's meta.json, or --image-size W H for all images.

Rules: released (only the "left" sector survives, as adj.py ships; CEFG's default), all_sectors
(itmkit: all 8 sectors, the 4 nearest kept; written to {split}_ims_dir_allsectors.npy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_prep/x.py` from a checkout without install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("precomp_dir", type=Path, help="folder holding {split}_ims.npy and the boxes; outputs go here")
    parser.add_argument("--splits", nargs="+", default=None, help="splits to write (default: every split with boxes)")
    parser.add_argument("--rule", choices=["released", "all_sectors"], default="released", help="default: released")
    parser.add_argument("--image-size", type=float, nargs=2, metavar=("W", "H"), help="one size for every image")
    parser.add_argument("--allow-pickle", action="store_true", help="read the reference's {split}_ims_size.npy dicts")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # imported after parsing so that --help answers without loading torch
    from itmkit.data.errors import DataFormatError
    from itmkit.data.precomp import list_splits
    from itmkit.data.spatial_adjacency import write_split_adjacency

    root = args.precomp_dir
    splits = args.splits or [s for s in list_splits(root)
                             if (root / f"{s}_ims_bbx.npy").is_file() or (root / f"{s}_boxes.npy").is_file()]  # fmt: skip
    if not splits:
        print(f"error: {root}: no split with {{split}}_ims_bbx.npy or {{split}}_boxes.npy", file=sys.stderr)
        return 2
    try:
        for split in splits:
            path = write_split_adjacency(root, split, args.rule, args.image_size, args.allow_pickle)
            print(f"{split:8s} -> {path}")
    except DataFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
