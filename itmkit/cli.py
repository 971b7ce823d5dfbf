"""The ``itmkit`` command (also ``python -m itmkit``): train, evaluate, ensemble, data tools.

    itmkit methods                                   registered methods and their presets
    itmkit presets vse_infty [course]                a preset's full config as JSON
    itmkit train --method vse_infty --preset course [--data DIR] [--out DIR] [--set train.epochs=3]
    itmkit eval runs/x/model_best.pt [--data DIR] [--split test] [--protocol coco-5fold-1k] [--out DIR]
    itmkit ensemble a/sims.npy b/sims.npy --protocol coco-5fold-1k coco-5k [--weights 1 1]
    itmkit retrieve runs/x --caption 12 | --image 3 | --text "a red circle" [-k 5] [--split test]
    itmkit study --methods vse_infty scan --seeds 0 1 2 [--preset course] [--out runs/study] [--compare scan:vse_infty]
    itmkit diagnose runs/scan                        hard-negative (swap) scores of a run on the embedded test set
    itmkit data verify DIR                           check a precomp folder (layout and NaN/Inf values)
    itmkit data build-embedded --preset course       build (or find) the embedded data set

Every subcommand has ``--help``. Errors print one line naming what was wrong and exit 1 (2 for a
malformed command line). ``--threads N`` (or ``ITMKIT_THREADS``) sets torch's CPU threads; the
default is the CPUs this process may use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd


def parse_override(text: str) -> tuple[str, str]:
    """``"train.epochs=3"`` -> ``("train.epochs", "3")``. The value stays text: the config field's
    type reads it (:func:`itmkit.config_checks.parse_value`), so ``3``, ``yes``, ``[15, 20]``,
    ``null`` mean what the field needs and a path or split name stays a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    return key.strip(), raw.strip()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--max-steps 0`` would train nothing and say it did)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, found {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, found {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (what is wrong, and where the help is), exit 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print_table(frame: pd.DataFrame) -> None:
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 80):
        print(frame.to_string(index=False))


# --- subcommands ---------------------------------------------------------------------------
def cmd_methods(args) -> int:
    from itmkit.methods.registry import available_methods, get_method

    for name in available_methods():
        try:
            spec = get_method(name)
        except Exception as err:  # a broken or unwritten method file only breaks its own entry
            print(f"{name}\n  unavailable: {type(err).__name__}: {err}\n")
            continue
        print(f"{name}  ({spec.spec})" if spec.spec else name)
        if spec.description:
            print(f"  {spec.description}")
        print(f"  presets: {', '.join(spec.presets)}\n")
    return 0


def cmd_presets(args) -> int:
    from itmkit.methods.registry import get_method

    spec = get_method(args.method)
    if args.preset is None:
        print("\n".join(spec.presets))
        return 0
    print(spec.preset(args.preset).to_json())
    return 0


def build_run_config(args):
    """The preset of ``args.method`` with ``--set``, ``--data``, ``--seed``, ``--device`` applied;
    every value checked by name, type and range (``ValueError`` naming the option)."""
    from itmkit.config import ConfigError, replace_nested
    from itmkit.methods.registry import get_method

    cfg = get_method(args.method).preset(args.preset)
    overrides, origin = {}, {}
    for item in args.set or []:
        key, value = parse_override(item)
        overrides[key], origin[key] = value, f"--set {key}={value}"
    for flag, key, value in (("--data", "data.data_dir", args.data), ("--seed", "train.seed", args.seed),
                             ("--device", "train.device", args.device)):  # fmt: skip
        if value is not None:
            overrides[key], origin[key] = str(value), f"{flag} {value}"
    try:
        return replace_nested(cfg, overrides)
    except ConfigError as err:
        given = origin.get(err.key.split("[")[0])
        if given is None:
            raise
        raise ValueError(f"{given}: {err.key}: expected {err.expected}, found {err.found!r}") from None


def cmd_train(args) -> int:
    from itmkit.train.trainer import RunConfigMismatch, train

    from itmkit.evaluate.sharded import process_group_from_env

    cfg = build_run_config(args)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.method}-{cfg.preset}"
    # under torchrun every rank trains its share of each batch (DDP); rank 0 writes and reports
    with process_group_from_env(cfg.train.device) as group:
        if group.rank == 0:
            world = f" on {group.world} processes" if group.world > 1 else ""
            print(f"training {cfg.method} ({cfg.preset}) into {out}{world}", file=sys.stderr)
        try:
            result = train(cfg, out, resume=not args.no_resume, progress=not args.quiet, max_steps=args.max_steps,
                           device=group.device)  # fmt: skip
        except RunConfigMismatch as err:  # say it with this command's options, not train()'s arguments
            raise ValueError(f"{err.path}: the run in this folder used another config; differing fields: "
                             f"{'; '.join(err.differences)}. Use another --out DIR, or add --no-resume to "
                             "start over in this folder (its run files are replaced)") from None
        if group.rank != 0:
            return 0
    if not result.finished:
        print(f"stopped after --max-steps; resume with the same command. Checkpoint: {out / 'checkpoint.pt'}")
        return 0
    print(f"best dev rsum {result.best_rsum:.2f} at epoch {result.best_epoch}; model: {result.checkpoint}")
    if result.test_metrics is not None:
        from itmkit.evaluate.protocols import summary_rows

        _print_table(summary_rows(result.test_metrics))
    return 0


def cmd_eval(args) -> int:
    from itmkit.evaluate.evaluator import evaluate_model
    from itmkit.runs import load_run, resolve_checkpoint
    from itmkit.train.trainer import resolve_data_dir

    from itmkit.evaluate.sharded import evaluate_sharded, process_group_from_env, rank_and_world

    ckpt = resolve_checkpoint(args.checkpoint)
    with process_group_from_env(args.device) as group:
        model, cfg, pipeline = load_run(ckpt, device=group.device)
        data_dir = Path(args.data) if args.data is not None else resolve_data_dir(cfg)
        out = Path(args.out) if args.out else ckpt.parent / f"eval-{args.split}"
        if group.world > 1:  # under torchrun: every rank scores its rows of one shared sims.npy
            if args.float64 or args.max_captions:
                raise ValueError("--float64 and --max-captions are one-process options; run without torchrun")
            result = evaluate_sharded(model, data_dir, args.split, pipeline, out, protocol=args.protocol,
                                      batch_size=args.batch_size, device=group.device, progress=not args.quiet)  # fmt: skip
        else:
            result = evaluate_model(model, data_dir, args.split, pipeline, protocol=args.protocol, out_dir=out,
                                    batch_size=args.batch_size, max_captions=args.max_captions,
                                    progress=not args.quiet, score_dtype="float64" if args.float64 else "float32")  # fmt: skip
        if rank_and_world()[0] == 0:
            _print_table(result.summary)
            print(f"saved metrics.csv, metrics.json and sims.npy in {out}" + (f" ({group.world} processes)" if group.world > 1 else ""))
    return 0


def retrieval_table(model, pipeline, split, *, caption=None, image=None, text=None, k=5, progress=False):
    """``(heading, table)`` of a retrieval query on ``split``: the ``k`` best images of caption
    ``caption`` or of free ``text``, or the ``k`` best captions of image ``image``
    (:mod:`itmkit.evaluate.retrieval`; ranks as the metrics count them)."""
    from itmkit.evaluate.evaluator import encode_split, encode_split_images, encode_texts, similarity_matrix
    from itmkit.evaluate.retrieval import captions_for_images, images_for_captions, top_k

    def image_ids(indices):
        return [split.image_ids[i] if split.image_ids is not None else i for i in indices]

    if text is not None:
        images = encode_split_images(model, split, range(split.n_images))
        scores = similarity_matrix(model, images, encode_texts(model, pipeline, [text]), progress=progress)[:, 0]
        found = top_k(scores, k)
        table = pd.DataFrame({"position": range(1, found.k + 1), "image": found.indices[0],
                              "image_id": image_ids(found.indices[0]), "score": found.scores[0]})  # fmt: skip
        return f"text {text!r}: the {found.k} best of {split.n_images} {split.split} images", table
    sims = similarity_matrix(model, *encode_split(model, split, pipeline, progress=progress), progress=progress)
    if caption is not None:
        found = images_for_captions(sims, [caption], k)
        own = split.image_of_caption(caption)
        heading = f"caption {caption} {split.captions[caption]!r}: its image {own} ranks #{found.match_rank[0] + 1}"
        heading += f" of {split.n_images}"
        table = pd.DataFrame({"position": range(1, found.k + 1), "image": found.indices[0],
                              "image_id": image_ids(found.indices[0]), "score": found.scores[0],
                              "match": found.is_match[0]})  # fmt: skip
        return heading, table
    found = captions_for_images(sims, [image], k)
    heading = f"image {image}: its best caption ranks #{found.match_rank[0] + 1} of {split.n_captions}"
    table = pd.DataFrame({"position": range(1, found.k + 1), "caption": found.indices[0], "score": found.scores[0],
                          "match": found.is_match[0]})
    table["text"] = [split.captions[c] for c in found.indices[0]]
    return heading, table


def cmd_retrieve(args) -> int:
    from itmkit.data.precomp import PrecompSplit
    from itmkit.runs import load_run
    from itmkit.train.trainer import resolve_data_dir

    model, cfg, pipeline = load_run(args.run, device=args.device)
    data_dir = Path(args.data) if args.data is not None else resolve_data_dir(cfg)
    split = PrecompSplit.open(data_dir, args.split)
    heading, table = retrieval_table(model, pipeline, split, caption=args.caption, image=args.image, text=args.text,
                                     k=args.k, progress=not args.quiet)  # fmt: skip
    print(heading)
    _print_table(table.round({"score": 4}))
    return 0


def cmd_ensemble(args) -> int:
    from itmkit.evaluate.ensemble import evaluate_ensemble

    result = evaluate_ensemble(args.sims, protocols=args.protocol, weights=args.weights, out_dir=args.out,
                               allow_pickle=args.allow_pickle)  # fmt: skip
    _print_table(result.summary)
    if args.out:
        print(f"saved metrics.csv, metrics.json and sims.npy in {args.out}")
    return 0


def cmd_study(args) -> int:
    from itmkit.study import StudyPlan, compare_methods, reported_gaps, run_study

    overrides = dict(parse_override(item) for item in (args.set or []))
    plan = StudyPlan(args.methods, args.seeds, args.preset, args.data_seeds, args.data, overrides)
    compare = []
    for item in args.compare or []:
        a, sep, b = item.partition(":")
        if not sep or a not in plan.methods or b not in plan.methods:
            raise ValueError(f"--compare {item!r}: expected A:B with both methods in --methods {list(plan.methods)}")
        compare.append((a, b))
    study = run_study(plan, args.out, progress=not args.quiet, device=args.device, shared_runs=args.shared_runs)
    _print_table(study.runs.drop(columns=["run_dir"]).round(2))
    print()
    _print_table(study.summary[study.summary["metric"].isin(["rsum", "group_all"])].round(2))
    from itmkit.evaluate.atomic_write import write_csv

    if compare:
        table = compare_methods(study, compare)
        write_csv(Path(args.out) / "study_comparisons.csv", table)
        print()
        _print_table(table.drop(columns=["test"]).round(4))
    gaps = reported_gaps(study.summary)
    if not gaps.empty:
        write_csv(Path(args.out) / "reported_gaps.csv", gaps)
    print(f"\nsaved study_runs.csv, study_summary.csv{', study_comparisons.csv' if compare else ''} in {args.out}")
    return 0


def cmd_diagnose(args) -> int:
    from itmkit.study import diagnose_run

    table = diagnose_run(args.run, progress=not args.quiet, device=args.device)
    _print_table(table.round(1))
    return 0


def cmd_data_verify(args) -> int:
    from itmkit.data.precomp import verify_precomp

    table = verify_precomp(args.folder, check_values=not args.no_values)
    _print_table(table)
    return 0 if (table["status"] == "ok").all() else 1


def cmd_data_build_embedded(args) -> int:
    from itmkit.data.embedded import embedded_dataset

    folder = embedded_dataset(preset=args.preset, seed=args.seed, root=args.root, force=args.force)
    print(folder)
    return 0


# --- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from itmkit.evaluate.protocols import PROTOCOLS

    parser = OneLineParser(prog="itmkit", description="Fine-grained image-text matching: train, "
                           "evaluate and ensemble methods on SCAN precomp data.")  # fmt: skip
    threads = OneLineParser(add_help=False)
    threads.add_argument("--threads", type=positive_int, metavar="N",
                         help="CPU threads for torch (default: $ITMKIT_THREADS, else the CPUs this process may use; "
                              "1 where many people share the cores)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("methods", help="list registered methods and their presets")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("presets", help="list a method's presets, or print one as JSON")
    p.add_argument("method")
    p.add_argument("preset", nargs="?")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("train", help="train a method (resumes an existing run directory)", parents=[threads],
                       epilog="Several processes (DDP, one per GPU): torchrun --nproc_per_node N -m itmkit train ... "
                              "(docs/gpu_training.md)")  # fmt: skip
    p.add_argument("--method", required=True, help="registered method name (see `itmkit methods`)")
    p.add_argument("--preset", default="course", help="preset name: smoke, course, paper, ... (default course)")
    p.add_argument("--data", help="precomp folder (default: the preset's; embedded set when none)")
    p.add_argument("--out", help="run directory (default runs/<method>-<preset>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, repeatable: train.epochs=3")
    p.add_argument("--seed", type=non_negative_int, help="train.seed")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--max-steps", type=positive_int, metavar="N",
                   help="stop after N >= 1 steps (checkpointed; run again to resume)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run directory has a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (model_best.pt or a run directory)", parents=[threads])
    p.add_argument("checkpoint", help="model_best.pt / checkpoint.pt or a run directory")
    p.add_argument("--data", help="precomp folder (default: the run's data)")
    p.add_argument("--split", default="test", help="split name: test, testall, dev (default test)")
    p.add_argument("--protocol", nargs="+", choices=sorted(PROTOCOLS),
                   help="default: coco-5fold-1k and coco-5k for testall, else test (whole matrix)")
    p.add_argument("--out", help="output folder (default <checkpoint folder>/eval-<split>)")
    p.add_argument("--device", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N", help="items encoded at once (default 256)")
    p.add_argument("--max-captions", type=positive_int, metavar="N",
                   help="only the first N captions, a multiple of 5 (dev validation uses 5000)")
    p.add_argument("--float64", action="store_true",
                   help="score in float64 as the references do (exact reproduction; default float32, half the memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ensemble", help="average saved similarity matrices (sims.npy) and evaluate", parents=[threads])
    p.add_argument("sims", nargs="+", help="two or more sims.npy files over the same split")
    p.add_argument("--protocol", nargs="+", default=["test"], choices=sorted(PROTOCOLS))
    p.add_argument("--weights", nargs="+", type=float, help="one weight per matrix (default equal)")
    p.add_argument("--out", help="folder for the ensemble's metrics and sims.npy")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read the references' pickled {'npts', 'sims'} files (only files you trust)")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("retrieve", help="the best images of a caption or text, or the best captions of an image")
    p.add_argument("run", help="a run directory or checkpoint (model_best.pt)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--caption", type=int, help="a caption index of the split: its best images")
    query.add_argument("--image", type=int, help="an image index of the split: its best captions")
    query.add_argument("--text", help="any text: the best images for it")
    p.add_argument("-k", type=int, default=5, help="how many to list (default 5)")
    p.add_argument("--data", help="precomp folder (default: the run's data)")
    p.add_argument("--split", default="test", help="split name (default test)")
    p.add_argument("--device", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser("study", help="train methods x seeds and table the spread, paired tests and swap scores")
    p.add_argument("--methods", nargs="+", required=True, help="registered method names")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--data-seeds", nargs="+", type=int, help="embedded-set seeds (default the preset's)")
    p.add_argument("--preset", default="course", help="every method's preset (default course)")
    p.add_argument("--data", help="precomp folder instead of the embedded set")
    p.add_argument("--out", default="runs/study", help="study folder (default runs/study); reruns reuse its runs")
    p.add_argument("--shared-runs", metavar="DIR", help="keep runs in DIR under shared names, e.g. runs/course/_shared_runs: "
                   "reuses what the course notebooks trained with the same settings")
    p.add_argument("--compare", nargs="+", metavar="A:B", help="paired tests of method A against B")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run, repeatable")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("diagnose", help="hard-negative swap scores (text/image/group per swap kind) of a run")
    p.add_argument("run", help="a run folder trained on the embedded set")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("data", help="data tools: verify, build-embedded")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    q = data_sub.add_parser("verify", help="check every split of a precomp folder, NaN/Inf feature values included")
    q.add_argument("folder")
    q.add_argument("--no-values", action="store_true", help="skip the NaN/Inf scan (it reads every feature value)")
    q.set_defaults(func=cmd_data_verify)
    q = data_sub.add_parser("build-embedded", help="build (or reuse) the embedded data set and print its folder",
                            parents=[threads])  # fmt: skip
    q.add_argument("--preset", default="course", choices=["tiny", "course"])
    q.add_argument("--seed", type=non_negative_int, default=0)
    q.add_argument("--root", help="parent folder (default the itmkit cache)")
    q.add_argument("--force", action="store_true", help="rebuild even if a complete copy exists")
    q.set_defaults(func=cmd_data_build_embedded)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``itmkit`` command. A user's mistake (a bad setting, a missing or malformed file, a
    device this machine lacks, a missing optional package) prints one line naming it and
    returns 1; argparse's own errors exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from itmkit.runtime import configure_threads

        configure_threads(getattr(args, "threads", None))
        return int(args.func(args) or 0)
    except (ValueError, KeyError, OSError, TypeError, ImportError, IndexError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"itmkit {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
