"""The benchmarks' memory sampler sees a child and its whole process tree, as psutil does, for less."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402

TREE = """
import multiprocessing, sys, time
def grandchild():
    block = bytearray(64 << 20)
    time.sleep(30)
def child():
    p = multiprocessing.Process(target=grandchild); p.start(); p.join()
if __name__ == "__main__":
    block = bytearray(96 << 20)
    p = multiprocessing.Process(target=child); p.start()
    print("ready", flush=True); p.join()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_tree_rss_sums_every_descendant_like_psutil():
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        ps = psutil.Process(proc.pid)
        deadline = time.monotonic() + 20
        while len(ps.children(recursive=True)) < 2 or common.tree_rss(ps) < 160 << 20:
            assert time.monotonic() < deadline, "the process tree never grew"
            time.sleep(0.05)
        want = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
        assert abs(common.tree_rss(ps) - want) < 8 << 20  # same pages, read a moment apart
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()
