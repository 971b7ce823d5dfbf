"""Benchmark: training throughput per method against the data-loading limit (issue 13 §3).

For each method's preset, times loading-only batches and real training steps on the same batches
(:func:`itmkit.train.throughput.measure_throughput`), prints a table and writes JSON. On CUDA it
also reports the peak GPU memory of the training steps.

    python benchmarks/train_throughput.py                       # every method, course preset, CPU or GPU
    python benchmarks/train_throughput.py --preset smoke --steps 3 --methods vse_infty scan
    python benchmarks/train_throughput.py --json runs/throughput.json --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import pandas as pd
import torch

from itmkit.config import replace_nested
from itmkit.methods.registry import available_methods, get_method
from itmkit.runtime import configure_threads
from itmkit.train.throughput import measure_throughput


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="registry names (default: all)")
    parser.add_argument("--preset", default="course", help="every method's preset (default course)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: ITMKIT_THREADS or all)")
    parser.add_argument("--json", type=Path, default=Path("runs/benchmarks/train_throughput.json"))
    args = parser.parse_args(argv)
    threads = configure_threads(args.threads)
    rows = []
    for method in args.methods or available_methods():
        spec = get_method(method)
        if args.preset not in spec.presets:
            print(f"{method}: no preset {args.preset!r}, skipped", file=sys.stderr)
            continue
        cfg = spec.preset(args.preset)
        if args.workers is not None:
            cfg = replace_nested(cfg, {"data.num_workers": args.workers})
        result = measure_throughput(cfg, steps=args.steps, warmup=args.warmup, device=args.device)
        rows.append(result.as_dict())
        print(f"{method:10s} train {result.train_pairs_per_s:9.1f} pairs/s   load {result.load_pairs_per_s:10.1f} pairs/s   "
              f"ratio {result.ratio:.3f}" + (f"   peak {result.peak_gpu_mib:.0f} MiB" if result.peak_gpu_mib else ""), flush=True)
    table = pd.DataFrame(rows)
    print()
    print(table[["method", "preset", "device", "batch_size", "steps", "train_pairs_per_s", "load_pairs_per_s", "ratio",
                 "peak_gpu_mib"]].round(3).to_string(index=False))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    machine = {"torch": torch.__version__, "threads": threads, "python": platform.python_version(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    tmp.replace(args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
