"""Shared helpers of the benchmarks: paths, the machine's description, child processes with peak memory.

Every benchmark that measures memory or a whole command runs it in a fresh child process, so that one
measurement never inherits another's imports, caches or heap. The child prints one JSON object as its
last stdout line; the parent samples the resident memory of the child *and its workers* every 20 ms.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"
DATA = ROOT.parent / "shared" / "data"
TOKENIZER = DATA / "qwen2.5-tokenizer" / "tokenizer.json"
CORPORA = {
    "reuters": DATA / "corpus" / "reuters21578" / "reuters21578.jsonl",
    "ectsum": DATA / "corpus" / "ectsum" / "ectsum.jsonl",
}
MIB = 1 << 20


def machine() -> dict:
    """What the figures were measured on, including how busy the machine was (others share it)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    import tokenizers
    import torch

    try:
        import tiktoken

        tiktoken_version = tiktoken.__version__
    except ImportError:
        tiktoken_version = None
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "tokenizers": tokenizers.__version__,
        "tiktoken": tiktoken_version,
        "torch": torch.__version__,
        "gpu": None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def tree_rss(ps: psutil.Process) -> int:
    """Resident bytes of ``ps`` and all its descendants.

    Read from ``/proc/PID/task/TID/children`` and ``/proc/PID/statm`` where the kernel has them: 0.1 ms a
    sample, where psutil's ``children(recursive=True)`` scans every process on the machine (2.3 ms
    measured here), which at 50 samples a second took ~10% of a core from the run being measured.
    """
    if not os.path.exists(f"/proc/{ps.pid}/task/{ps.pid}/children"):  # another kernel, or it exited
        return sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
    pids, i = [ps.pid], 0
    while i < len(pids):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # exited meanwhile
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                    pids.extend(int(pid) for pid in f.read().split())
        i += 1
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * PAGE
    return total


PAGE = os.sysconf("SC_PAGE_SIZE")


def run_child(args: list[str], *, env: dict | None = None, timeout: float = 900) -> dict:
    """Run ``python args...`` and return its JSON result plus ``wall_s`` and ``peak_rss_mib``.

    ``peak_rss_mib`` is the largest sum of resident memory over the child and all its descendants seen
    by sampling (forked workers share pages with their parent, so the sum is an upper bound).
    """
    child_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env, text=True
    )
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error, OSError, ValueError):  # it is exiting
            peak = max(peak, tree_rss(ps))
        time.sleep(0.02)
        if time.perf_counter() - start > timeout:
            proc.kill()
            raise TimeoutError(f"{args} ran longer than {timeout}s")
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_s=wall, peak_rss_mib=peak / MIB)
    return result


def emit(result: dict) -> None:
    """A child's last stdout line: its result."""
    print(json.dumps(result), flush=True)


def self_peak_rss_mib() -> float:
    """This process's own peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_run(runs: list[dict], key: str) -> dict:
    """The run with the median ``key`` (the lower middle one for an even count), plus every run's ``key``.

    The box is shared: a figure from one run moves by tens of percent with other jobs, so benchmarks that
    set a verdict run a few times, interleaved with their reference, and report the median run.
    """
    ranked = sorted(runs, key=lambda run: run[key])
    return {**ranked[(len(ranked) - 1) // 2], f"runs_{key}": [run[key] for run in runs]}
