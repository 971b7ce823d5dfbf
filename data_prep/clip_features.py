"""AAHR's frozen CLIP features beside the precomp files: {split}_clip_img.npy / {split}_clip_cap.npy (aahr.md §8).

    pip install 'itmkit[clip]'            # open-clip-torch: the ViT-B-32 config and BPE vocabulary ship with it
    python data_prep/clip_features.py data/coco_precomp \\
        --checkpoint CLIP/open_clip_pytorch_model.bin --images data/coco/images --id-mapping data/id_mapping.json

The weights are a local file you supply: open_clip_pytorch_model.bin of laion/CLIP-ViT-B-32-laion2B-s34B-b79K
(the reference's CLIP). Nothing is downloaded. Images: the raw photographs, found through
{split}_ids.txt and an id -> relative path map (COCO: the reference's id_mapping.json; Flickr30K: make
one from Karpathy's dataset_flickr30k.json, or name files <id>.jpg and leave --id-mapping out).
Outputs: float32 [n_images, 512] and [n_captions, 512], the un-normalised encode_image (val
preprocessing: resize 224 bicubic, centre crop, OpenAI mean/std) and encode_text outputs, as the
reference computes them on the fly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_prep/x.py` from a checkout without install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("precomp_dir", type=Path, help="folder holding {split}_caps.txt and {split}_ids.txt; outputs go here")
    parser.add_argument("--checkpoint", type=Path, required=True, help="local OpenCLIP weights (open_clip_pytorch_model.bin)")
    parser.add_argument("--images", type=Path, required=True, help="folder of the raw images")
    parser.add_argument("--id-mapping", type=Path, default=None, help='JSON {"<image id>": "<relative path>"}')
    parser.add_argument("--splits", nargs="+", default=None, help="splits to write (default: every split of the folder)")
    parser.add_argument("--model", default="ViT-B-32", help="OpenCLIP architecture name (default ViT-B-32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    problems = []
    if not args.precomp_dir.is_dir():
        problems.append(f"{args.precomp_dir}: no such folder (the precomp folder)")
    if not args.checkpoint.is_file():
        problems.append(f"{args.checkpoint}: no such file (--checkpoint: the OpenCLIP weights you supply)")
    if not args.images.is_dir():
        problems.append(f"{args.images}: no such folder (--images: the raw images)")
    if args.id_mapping is not None and not args.id_mapping.is_file():
        problems.append(f"{args.id_mapping}: no such file (--id-mapping)")
    if args.batch_size < 1:
        problems.append(f"--batch-size: expected >= 1, found {args.batch_size}")
    if problems:
        parser.error("; ".join(problems))
    return args


def open_clip_encoders(checkpoint: Path, model_name: str = "ViT-B-32", device: str = "cpu"):
    """``(encode_images(paths) -> [n, 512], encode_texts(captions) -> [n, 512])`` of a local OpenCLIP
    checkpoint (frozen, eval mode, no gradient). Needs ``open-clip-torch`` (the ``clip`` extra)."""
    try:
        import open_clip
    except ImportError:
        raise SystemExit("error: open_clip is not installed: pip install 'itmkit[clip]' (open-clip-torch)") from None
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint), device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)

    @torch.no_grad()
    def encode_images(paths):
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]).to(device)
        return model.encode_image(pixels).float().cpu().numpy()

    @torch.no_grad()
    def encode_texts(captions):
        return model.encode_text(tokenizer(list(captions)).to(device)).float().cpu().numpy()

    return encode_images, encode_texts


def main(argv: list[str] | None = None, encoders=None) -> int:
    """``encoders``: ``(encode_images, encode_texts)`` to use instead of OpenCLIP (tests)."""
    args = parse_args(argv)
    from itmkit.data.errors import DataFormatError
    from itmkit.data.global_features import image_files, write_clip_features
    from itmkit.data.precomp import PrecompSplit, list_splits

    splits = args.splits or list_splits(args.precomp_dir)
    if not splits:
        print(f"error: {args.precomp_dir}: no split ({{split}}_caps.txt + {{split}}_ims.npy)", file=sys.stderr)
        return 2
    try:
        mapping = None if args.id_mapping is None else json.loads(args.id_mapping.read_text())
        opened = [PrecompSplit.open(args.precomp_dir, s) for s in splits]
        files = [image_files(split, args.images, mapping) for split in opened]  # every file checked before encoding
        encode_images, encode_texts = encoders or open_clip_encoders(args.checkpoint, args.model, args.device)
        for split, split_files in zip(opened, files):
            paths = write_clip_features(split, split_files, encode_images, encode_texts, batch_size=args.batch_size)
            print(f"{split.split:8s} -> {paths[0].name}, {paths[1].name}")
    except (DataFormatError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
