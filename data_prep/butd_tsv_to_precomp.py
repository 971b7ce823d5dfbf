"""Bottom-up-attention TSV -> precomp {split}_ims.npy (+ {split}_boxes.npy) (baselines.md §A.4).

    python data_prep/butd_tsv_to_precomp.py data/f30k_precomp flickr30k_resnet101_faster_rcnn.tsv
    python data_prep/butd_tsv_to_precomp.py data/coco_precomp trainval/*.tsv test2014.tsv --splits train dev test testall

Reads each split's {split}_ids.txt (from karpathy_to_precomp.py) and fills the feature files in
that order, streaming row by row into memory-mapped outputs (never the whole array in RAM).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_prep/x.py` from a checkout without install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("precomp_dir", type=Path, help="folder holding {split}_ids.txt; outputs go here")
    parser.add_argument("tsv", type=Path, nargs="+", help="one or more BUTD TSV files (one pass over all)")
    parser.add_argument("--splits", nargs="+", default=None, help="splits to write (default: every {split}_ids.txt)")
    parser.add_argument("--num-boxes", type=int, default=36, help="boxes per image every row must have (default 36)")
    parser.add_argument("--feature-dim", type=int, default=2048, help="feature length per box (default 2048)")
    parser.add_argument("--no-boxes", action="store_true", help="do not write {split}_boxes.npy")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # imported after parsing so that --help answers without loading torch
    from itmkit.data.butd_tsv import tsv_to_precomp
    from itmkit.data.errors import DataFormatError

    try:
        counts = tsv_to_precomp(args.tsv, args.precomp_dir, splits=args.splits, num_boxes=args.num_boxes,
                                feature_dim=args.feature_dim, write_boxes=not args.no_boxes)
    except DataFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, n in counts.items():
        print(f"{split:8s} {n:7d} images -> {args.precomp_dir / (split + '_ims.npy')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
