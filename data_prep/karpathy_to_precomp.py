"""Karpathy split JSON -> precomp caption/id files (baselines.md §A.3).

    python data_prep/karpathy_to_precomp.py dataset_flickr30k.json data/f30k_precomp
    python data_prep/karpathy_to_precomp.py dataset_coco.json data/coco_precomp

Writes {train,dev,test[,testall]}_caps.txt, {split}_ids.txt and id_mapping.json. Features come
next, from a bottom-up-attention TSV: data_prep/butd_tsv_to_precomp.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_prep/x.py` from a checkout without install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("karpathy_json", type=Path, help="dataset_flickr30k.json or dataset_coco.json")
    parser.add_argument("out_dir", type=Path, help="precomp folder to write (created if absent)")
    coco = parser.add_mutually_exclusive_group()
    coco.add_argument("--coco", dest="coco", action="store_true", default=None,
                      help="write testall (5K) and test = its first 1K; default: when the JSON says dataset 'coco'")
    coco.add_argument("--no-coco", dest="coco", action="store_false", help="never write testall")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # imported after parsing so that --help answers without loading torch
    from itmkit.data.errors import DataFormatError
    from itmkit.data.karpathy import karpathy_to_precomp

    try:
        counts = karpathy_to_precomp(args.karpathy_json, args.out_dir, coco=args.coco)
    except DataFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, n in counts.items():
        print(f"{split:8s} {n:7d} images  {5 * n:7d} captions")
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
