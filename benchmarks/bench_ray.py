"""`prep pack --executor ray` versus `--executor local` on Reuters: wall time side by side, and the bytes compared.

Three runs per input layout, each a fresh `prep pack` process: local; ray starting its own Ray (what a
one-off command on a laptop pays); ray joining a Ray already started with `ray start --head` (what a
cluster user pays). Two layouts: the corpus as one file (pass 1 is then one task, given a whole node's
cores) and cut into 8 files (8 pass-1 tasks). Every ray output is compared byte for byte with local.

    python benchmarks/bench_ray.py [--seq-len 1024] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CORPORA, TOKENIZER, WORK  # noqa: E402

PREP = [sys.executable, "-c", "from prep.cli import main; main()"]
RAY_CLI = str(Path(sys.executable).with_name("ray"))


def digests(folder: Path) -> dict[str, str]:
    """sha256 of the shards and the manifest (the card names its own folder, so it is left out)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.suffix == ".arrow" or p.name == "manifest.json"
    }


def run_pack(inputs: list[str], out: Path, seq_len: int, extra: list[str], env: dict) -> float:
    args = [*inputs, "--tokenizer", str(TOKENIZER), "--out", str(out), "--seq-len", str(seq_len)]
    start = time.perf_counter()
    subprocess.run([*PREP, "pack", *args, "--overwrite", *extra], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def cut(corpus: Path, folder: Path, num_parts: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    step = -(-len(lines) // num_parts)
    paths = []
    for k in range(num_parts):
        path = folder / f"part{k}.jsonl"
        path.write_text("".join(lines[k * step : (k + 1) * step]), encoding="utf-8")
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    opts = parser.parse_args()
    work = WORK / "ray"
    shutil.rmtree(work, ignore_errors=True)
    corpus = CORPORA["reuters"]
    layouts = {"1 file": [str(corpus)], "8 files": cut(corpus, work / "parts", 8)}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    results = []
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for layout, inputs in layouts.items():
        out = work / f"local-{len(inputs)}"
        local_s = run_pack(inputs, out, opts.seq_len, ["--executor", "local"], env)
        want = digests(out)
        own_s = run_pack(inputs, work / "ray-own", opts.seq_len, ["--executor", "ray"], env)
        same_own = digests(work / "ray-own") == want
        subprocess.run(
            [RAY_CLI, "start", "--head", f"--num-cpus={opts.num_cpus}", "--include-dashboard=false"],
            check=True,
            env=env,
            capture_output=True,
        )
        try:
            joined = {**env, "RAY_ADDRESS": "auto"}
            join_s = run_pack(inputs, work / "ray-join", opts.seq_len, ["--executor", "ray"], joined)
        finally:
            subprocess.run([RAY_CLI, "stop"], check=True, env=env, capture_output=True)
        same_join = digests(work / "ray-join") == want
        row = {
            "layout": layout,
            "local_s": round(local_s, 1),
            "ray_own_s": round(own_s, 1),
            "ray_joined_s": round(join_s, 1),
            "ray_joined_over_local": round(join_s / local_s, 2),
            "identical": same_own and same_join,
            "shards": len(want) - 1,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
