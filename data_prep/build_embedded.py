"""Build the embedded data set (procedural scenes, captions, CNN region features) as a precomp folder.

    python data_prep/build_embedded.py --preset course --seed 0 --out DIR

Without ``--out`` the set goes to the cache ``embedded_dataset()`` reads
(``$ITMKIT_CACHE/embedded/<preset>-seed<seed>-<extractor>-<K>x<D>``). Presets: ``tiny`` (48/16/16
images, seconds) and ``course`` (600/100/100). ``--regions 36 --feature-dim 2048`` gives
BUTD-shaped arrays. See docs/embedded_data.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_prep/x.py` from a checkout without install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="course", choices=["tiny", "course"], help="size preset (default course)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the itmkit cache)")
    parser.add_argument("--regions", type=int, default=None, help="boxes per image (default: the preset's, 12)")
    parser.add_argument("--feature-dim", type=int, default=None, help="project features to this size (default 1360)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished folder exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # imported after parsing so that --help answers without loading torch
    from itmkit.data.embedded import PRESETS, build_embedded, embedded_dataset

    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in {"n_regions": args.regions, "feature_dim": args.feature_dim}.items() if v is not None}
    if overrides:
        preset = dataclasses.replace(preset, **overrides)
    progress = not args.no_progress
    if args.out is None:
        folder = embedded_dataset(preset, seed=args.seed, force=args.force, progress=progress)
    else:
        folder = build_embedded(preset, seed=args.seed, out_dir=args.out, force=args.force, progress=progress)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    counts = ", ".join(f"{split} {c['images']} images" for split, c in meta["counts"].items())
    print(f"{folder}\n{counts}; {meta['n_regions']} x {meta['feature_dim']} features; built in {meta['build_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
