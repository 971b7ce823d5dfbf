"""Check a precomp folder: open every split, print one row per split, exit 1 on any problem.

    python data_prep/verify.py data/f30k_precomp

Checks (baselines.md §A.1): files present and readable, features [n_img, regions, dim] float32,
5 captions per image (or 1 per feature row), no empty caption line, ids and boxes consistent,
and no NaN or Inf among the feature and box values (every value is read, a block of rows at a
time; --no-values skips that, e.g. for a quick look at COCO's 33 GB train file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_prep/x.py` from a checkout without install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("precomp_dir", type=Path, help="a precomp folder (f30k_precomp, coco_precomp, ...)")
    parser.add_argument("--no-values", action="store_true", help="skip the NaN/Inf scan of the feature values")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # imported after parsing so that --help answers without loading torch
    from itmkit.data.precomp import verify_precomp

    table = verify_precomp(args.precomp_dir, progress=True, check_values=not args.no_values)
    shown = table.drop(columns=["problem"]).copy()
    shown["size_mb"] = shown["size_mb"].map(lambda v: "" if v != v or v is None else f"{v:,.1f}")
    print(shown.astype(object).where(shown.notna(), "").to_string(index=False))
    problems = table[table["status"] != "ok"]
    for _, row in problems.iterrows():
        print(f"\nproblem in {row['split'] or args.precomp_dir}: {row['problem']}")
    if problems.empty:
        print("\nall splits ok")
    return 1 if len(problems) else 0


if __name__ == "__main__":
    sys.exit(main())
