"""Run every benchmark side by side with its reference and write BENCHMARKS.md and results.json.

The prep throughput sides run three times each, interleaved, and the ratios compare their medians.

Usage (from the repository root, with the `bench` extra installed)::

    python benchmarks/run_all.py                 # everything: about 15 minutes on an idle 2-core box
    python benchmarks/run_all.py --only prep     # one group: prep, memory, loader, train, loss

Needs the real corpora and the Qwen2.5 tokenizer in ../shared/data (see benchmarks/common.py). Scratch
files go to benchmarks/_work/ (gitignored) and are removed at the end. Nothing here asserts on time: a
benchmark reports, it never fails because a machine is slow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prep  # noqa: E402
import bench_train  # noqa: E402
import report  # noqa: E402
from common import ROOT, WORK, machine  # noqa: E402

GROUPS = ("prep", "memory", "loader", "train", "loss")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=GROUPS, action="append", help="run only these groups (repeatable)")
    parser.add_argument(
        "--memory-factor", type=int, default=20, help="size of the synthetic corpus vs Reuters"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--keep-work", action="store_true", help="keep benchmarks/_work for inspection")
    args = parser.parse_args()
    groups = args.only or list(GROUPS)
    WORK.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run_all.py" + "".join(f" --only {g}" for g in args.only or [])
    results: dict = {
        "command": command,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    start = time.perf_counter()

    def step(name: str, fn, *a, **kw):
        print(f"[{time.perf_counter() - start:6.0f}s] {name} ...", flush=True)
        try:
            results[name] = fn(*a, **kw)
        except Exception as e:  # one broken benchmark must not cost the others' figures
            results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[-2000:]
            print(f"  {name} failed: {e}", flush=True)

    if "prep" in groups:
        for corpus in ("reuters", "ectsum"):
            step(f"prep_{corpus}", bench_prep.throughput, corpus)
    if "memory" in groups or "loader" in groups:
        step("memory", bench_prep.memory, args.memory_factor, keep=True)
    if "memory" in groups:
        step("memory_tiny", bench_prep.tiny_memory)
    if "loader" in groups:
        folders = {"1x": WORK / "mem-1x", f"{args.memory_factor}x": WORK / f"mem-{args.memory_factor}x"}
        step("loader", bench_train.loader, folders)
    if "train" in groups:
        bench_prep.ensure_packed(bench_prep.CORPORA["reuters"], WORK / "mem-1x")
        step("train_step", bench_train.train_step, WORK / "mem-1x")
    if "loss" in groups:
        step("loss_memory", bench_train.loss_memory)
        step("loss_speed", bench_train.loss_speed)
    results["total_seconds"] = time.perf_counter() - start
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    args.out.write_text(report.render(results), encoding="utf-8")
    print(f"wrote {args.out} and {args.json} in {results['total_seconds']:.0f}s")
    if not args.keep_work:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
