"""Prep benchmarks: `prep pack` end to end versus `tokenizers` alone and the usual HF pipeline; packing
quality (rows versus the lower bound) and cost; peak memory as the corpus grows 20x, and over 10M tiny
documents (the cost per document).

The parent functions (``throughput``, ``memory``) run each measurement in a fresh child process
(``python benchmarks/bench_prep.py CHILD ...``) and compare them side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CORPORA, TOKENIZER, WORK, emit, median_run, run_child, self_peak_rss_mib  # noqa: E402

SEQ_LENS = (1024, 4096)
SCRIPT = str(Path(__file__).resolve())


# -- children ------------------------------------------------------------------------------------------


def _texts(path: str) -> list[str]:
    """The texts `prep pack` tokenizes: its own reader, so empty records are skipped the same way."""
    from prep.discovery import discover_inputs
    from prep.readers import read_records

    [source] = discover_inputs([path]).files
    return [r.text for r in read_records(source, "text", lambda n: None) if r.text is not None]


def child_reference(corpus: str, ids_out: str) -> None:
    """`tokenizers`' encode_batch_fast alone on texts already in memory (reference (a))."""
    from tokenizers import Tokenizer

    texts = _texts(corpus)
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    tokenizer.encode_special_tokens = True
    start = time.perf_counter()
    encoded = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    ids = [e.ids for e in encoded]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    np.save(ids_out, np.concatenate([np.array(x, dtype=np.int32) for x in ids]))
    np.save(ids_out.replace(".npy", "-lengths.npy"), lengths)
    emit({"seconds": seconds, "num_tokens": int(lengths.sum()), "num_docs": len(texts)})


class _PhaseTimer:
    """A pipeline Progress that records when each phase starts."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self.notices: list[str] = []

    def start(self, phase: str, total: float | None) -> None:
        self.marks.append((phase, time.perf_counter()))

    def advance(self, amount: float, **fields: int) -> None:
        pass

    def message(self, text: str) -> None:
        self.notices.append(text)


def _time_calls(module, name: str, label: str, into: dict[str, float]) -> None:
    """Replace ``module.name`` by a wrapper that adds its run time to ``into[label]``."""
    original = getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[label] = into.get(label, 0.0) + time.perf_counter() - start

    setattr(module, name, timed)


def child_pack(corpus: str, out: str, seq_len: int, strategy: str) -> None:
    """`prep pack` as the library call the CLI makes, timed from the call (imports excluded)."""
    import prep.encoder
    import prep.stages
    from prep.pipeline import PackConfig, pack

    timer = _PhaseTimer()
    fixed: dict[str, float] = {}
    _time_calls(prep.encoder, "FastBPE", "engine build", fixed)
    _time_calls(prep.stages, "write_card", "card", fixed)
    cfg = PackConfig(
        inputs=(corpus,),
        tokenizer=str(TOKENIZER),
        out=Path(out),
        seq_len=seq_len,
        strategy=strategy,
        overwrite=True,
    )
    start = time.perf_counter()
    manifest = pack(cfg, timer)
    end = time.perf_counter()
    marks = [("load", start), *timer.marks, ("end", end)]
    phases: dict[str, float] = {}
    for (name, t0), (_, t1) in zip(marks, marks[1:], strict=False):
        key = name.split()[0]  # "pack train" and "pack val" count together
        phases[key] = phases.get(key, 0.0) + t1 - t0
    train = manifest.splits["train"]
    phases.update({f"of which {k}": v for k, v in fixed.items()})
    emit(
        {
            "seconds": end - start,
            "phases": phases,
            "notices": timer.notices,
            "num_tokens": manifest.documents.tokens_packed,
            "num_rows": train.num_rows,
            "self_peak_rss_mib": self_peak_rss_mib(),
        }
    )


def child_hf(corpus: str, out: str) -> None:
    """The usual HF pipeline: datasets map tokenization, trl bfd_split packing, save_to_disk (reference (b))."""
    import datasets
    from transformers import PreTrainedTokenizerFast
    from trl import pack_dataset

    datasets.disable_caching()
    datasets.utils.logging.disable_progress_bar()
    cache = Path(out) / "cache"
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=str(cache))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    tokenized = ds.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=ds.column_names)
    t_tok = time.perf_counter()
    packed = pack_dataset(tokenized, seq_length=1024, strategy="bfd_split")
    t_pack = time.perf_counter()
    packed.save_to_disk(str(Path(out) / "packed"))
    end = time.perf_counter()
    num_tokens = int(sum(len(x) for x in tokenized["input_ids"]))
    rows = {1024: len(packed)}
    seconds_4096 = time.perf_counter()
    rows[4096] = len(pack_dataset(tokenized, seq_length=4096, strategy="bfd_split"))
    seconds_4096 = time.perf_counter() - seconds_4096
    emit(
        {
            "seconds": end - start,
            "phases": {"load+tokenize": t_tok - start, "pack": t_pack - t_tok, "save": end - t_pack},
            "num_tokens": num_tokens,
            "rows": {str(k): v for k, v in rows.items()},
            "pack_seconds_4096": seconds_4096,
        }
    )


# -- checks on the parent side ------------------------------------------------------------------------


def _doc_streams(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of every document's stream in doc order, stream length per document) read from the shards."""
    from shared.reader import PackedDataset

    split = PackedDataset(folder, verify="none").split("train")
    ids, seg_len, seg_doc = [], [], []
    for shard in split.shards:
        for batch in shard.batches():
            ids.append(batch.column("input_ids").values.to_numpy())
            cu = batch.column("cu_seqlens")
            values, offsets = cu.values.to_numpy().astype(np.int64), cu.offsets.to_numpy()
            diffs = np.diff(values)
            seg_len.append(np.delete(diffs, offsets[1:-1] - 1))  # drop the jumps between rows
            seg_doc.append(batch.column("doc_ids").values.to_numpy())
    tokens, seg_len, seg_doc = np.concatenate(ids), np.concatenate(seg_len), np.concatenate(seg_doc)
    seg_start = np.cumsum(seg_len) - seg_len
    order = np.argsort(seg_doc, kind="stable")  # a document's fragments are stored in stream order
    lens = seg_len[order]
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    streams = tokens[np.repeat(seg_start[order], lens) + within]
    doc_len = np.bincount(seg_doc, weights=seg_len)
    return streams, doc_len[doc_len > 0].astype(np.int64)


def ids_identical(folder: Path, ref_ids: Path) -> bool:
    """Whether the packed documents, EOS removed, are exactly `tokenizers`' ids of the same texts."""
    streams, doc_len = _doc_streams(folder)
    keep = np.ones(len(streams), dtype=bool)
    keep[np.cumsum(doc_len) - 1] = False  # each stream's EOS
    want = np.load(ref_ids)
    want_len = np.load(str(ref_ids).replace(".npy", "-lengths.npy"))
    return bool(np.array_equal(streams[keep], want) and np.array_equal(doc_len - 1, want_len))


def packing_quality(folder: Path) -> dict:
    """Rows versus the lower bound for bfd and wrapped at each seq_len, with the planning time."""
    from prep.packing import make_plan

    _, doc_len = _doc_streams(folder)
    total = int(doc_len.sum())
    out = {}
    for seq_len in SEQ_LENS:
        lower = -(-total // seq_len)
        for strategy in ("bfd", "wrapped"):
            start = time.perf_counter()
            plan = make_plan(strategy, doc_len, seq_len)
            out[f"{strategy}@{seq_len}"] = {
                "rows": plan.num_rows,
                "lower_bound": lower,
                "excess": plan.num_rows / lower - 1,
                "plan_seconds": time.perf_counter() - start,
            }
    return out


# -- parent -------------------------------------------------------------------------------------------


REPEATS = 3
"""Runs of each side per corpus. The box is shared: one run of `prep pack` on Reuters took 2.9-4.8 s
in the same hour, so every ratio compares medians of interleaved runs rather than two single shots."""


def gzip_copy(source: Path, target: Path) -> Path:
    """``source`` gzipped at the default level 6 (what `gzip FILE` writes), once."""
    import gzip

    with source.open("rb") as src, gzip.open(target, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return target


def shards_identical(a: Path, b: Path) -> bool:
    """Whether two packed folders hold the same shard files, byte for byte."""
    names = sorted(p.name for p in a.glob("*.arrow"))
    return names == sorted(p.name for p in b.glob("*.arrow")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def throughput(name: str, repeats: int = REPEATS) -> dict:
    """Ours versus (a) tokenizers alone and (b) the HF pipeline on one corpus, plus packing quality, and
    ours on the same corpus gzipped (`.jsonl.gz`, decompressed in the packing run) against the plain file.

    Each round runs the sides one after the other, in an order rotated by one every round (so no
    side always runs first, on a cooler or a busier box); each side's median run is compared.
    """
    corpus = str(CORPORA[name])
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ref_ids = work / "reference-ids.npy"
    gzipped = gzip_copy(Path(corpus), work / f"{name}.jsonl.gz")
    sides = {
        "reference": [SCRIPT, "reference", corpus, str(ref_ids)],
        "ours": [SCRIPT, "pack", corpus, str(work / "packed"), "1024", "bfd"],
        "hf": [SCRIPT, "hf", corpus, str(work / "hf")],
        "gz": [SCRIPT, "pack", str(gzipped), str(work / "packed-gz"), "1024", "bfd"],
    }
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    order = list(sides)
    for k in range(repeats):
        turn = k % len(order)
        for side in order[turn:] + order[:turn]:
            shutil.rmtree(work / "hf", ignore_errors=True)  # every HF run starts from an empty cache
            runs[side].append(run_child(sides[side]))
    reference, ours, hf, gz = (median_run(runs[side], "seconds") for side in sides)
    quality = packing_quality(work / "packed")
    for seq_len in SEQ_LENS:
        lower = -(-hf["num_tokens"] // seq_len)
        rows = hf["rows"][str(seq_len)]
        quality[f"trl bfd_split@{seq_len}"] = {"rows": rows, "lower_bound": lower, "excess": rows / lower - 1}
    result = {
        "corpus": name,
        "repeats": repeats,
        "reference_tokenizers": reference,
        "ours": ours,
        "hf_pipeline": hf,
        "ids_identical": ids_identical(work / "packed", ref_ids),
        "speedup_vs_tokenizers": reference["seconds"] / ours["seconds"],
        "speedup_vs_hf": hf["seconds"] / ours["seconds"],
        "jsonl_gz": {
            "ours": gz,
            "compressed_bytes": gzipped.stat().st_size,
            "plain_bytes": Path(corpus).stat().st_size,
            "time_ratio": gz["seconds"] / ours["seconds"],
            "shards_identical": shards_identical(work / "packed", work / "packed-gz"),
        },
        "packing_share": ours["phases"].get("pack", 0.0) / ours["seconds"],
        "packing": quality,
    }
    shutil.rmtree(work / "hf", ignore_errors=True)
    return result


def make_synthetic(factor: int) -> Path:
    """Reuters repeated ``factor`` times, each copy perturbed (a copy tag), as a larger JSONL corpus."""
    path = WORK / f"reuters-x{factor}.jsonl"
    if path.exists():
        return path
    lines = CORPORA["reuters"].read_text(encoding="utf-8").splitlines()
    with open(path, "w", encoding="utf-8") as f:
        for k in range(factor):
            for line in lines:
                record = json.loads(line)
                if record.get("text"):
                    record["text"] = f"[copy {k}] {record['text']}"
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def ensure_packed(corpus: Path, out: Path) -> dict | None:
    """Pack ``corpus`` into ``out`` at 1024/bfd unless a finished dataset is already there."""
    if (out / "manifest.json").exists():
        return None
    return run_child([SCRIPT, "pack", str(corpus), str(out), "1024", "bfd"])


def memory(factor: int = 20, *, keep: bool = False) -> dict:
    """Peak RSS of `prep pack` on Reuters and on Reuters x factor: does it stay flat as the corpus grows?

    With ``keep`` the two packed datasets stay in benchmarks/_work for the loader benchmark."""
    synthetic = make_synthetic(factor)
    shutil.rmtree(WORK / "mem-1x", ignore_errors=True)
    shutil.rmtree(WORK / f"mem-{factor}x", ignore_errors=True)
    base = ensure_packed(CORPORA["reuters"], WORK / "mem-1x")
    big = ensure_packed(synthetic, WORK / f"mem-{factor}x")
    if not keep:
        shutil.rmtree(WORK / "mem-1x", ignore_errors=True)
        shutil.rmtree(WORK / f"mem-{factor}x", ignore_errors=True)
    return {
        "factor": factor,
        "input_bytes": {"1x": CORPORA["reuters"].stat().st_size, f"{factor}x": synthetic.stat().st_size},
        "1x": base,
        f"{factor}x": big,
        "growth": big["peak_rss_mib"] / base["peak_rss_mib"],
    }


TINY_DOCS = 10_000_000
TINY_TARGET_GB = 0.8
"""Peak RSS target of `prep pack` over TINY_DOCS tiny documents: the cost per document, not per token."""


def make_tiny(num_docs: int) -> Path:
    """``num_docs`` distinct one-line documents (``{"text": "a b 17"}``) as JSONL, generated into _work."""
    path = WORK / f"tiny-{num_docs}.jsonl"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="ascii") as f:
            for lo in range(0, num_docs, 100_000):
                f.write("".join(f'{{"text": "a b {i}"}}\n' for i in range(lo, min(num_docs, lo + 100_000))))
        tmp.rename(path)
    return path


def child_tiny(corpus: str, tokenizer: str, out: str) -> None:
    """`prep pack` at the defaults (bfd, 1024) over the tiny corpus, with the bundled sample tokenizer."""
    from prep.pipeline import PackConfig, pack

    start = time.perf_counter()
    manifest = pack(PackConfig(inputs=(corpus,), tokenizer=tokenizer, out=Path(out), overwrite=True))
    emit(
        {
            "seconds": time.perf_counter() - start,
            "num_docs": manifest.documents.packed,
            "num_tokens": manifest.documents.tokens_packed,
            "self_peak_rss_mib": self_peak_rss_mib(),
        }
    )


def tiny_memory(num_docs: int = TINY_DOCS, small: int = 1_000_000) -> dict:
    """Peak RSS (process tree) of `prep pack` over ``small`` and ``num_docs`` tiny documents, and the bytes
    per document by which the main process's peak grows between them (planning and the card, where the
    per-document arrays are; the tree's peak at ``small`` is the tokenizing workers', which holds batches)."""
    from prep.sample import write_sample

    _, tokenizer = write_sample(WORK / "tiny-sample")
    runs = {}
    for n in (small, num_docs):
        out = WORK / f"tiny-{n}-packed"
        runs[str(n)] = run_child([SCRIPT, "tiny", str(make_tiny(n)), str(tokenizer), str(out)], timeout=3600)
        shutil.rmtree(out, ignore_errors=True)
    big, base = runs[str(num_docs)], runs[str(small)]
    return {
        "num_docs": num_docs,
        "small": small,
        "runs": runs,
        "peak_gb": big["peak_rss_mib"] * 2**20 / 1e9,
        "bytes_per_doc": (big["self_peak_rss_mib"] - base["self_peak_rss_mib"]) * 2**20 / (num_docs - small),
        "target_gb": TINY_TARGET_GB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("child", choices=["reference", "pack", "hf", "tiny", "tiny-parent"])
    parser.add_argument("args", nargs="*")
    a = parser.parse_args()
    if a.child == "reference":
        child_reference(*a.args)
    elif a.child == "pack":
        child_pack(a.args[0], a.args[1], int(a.args[2]), a.args[3])
    elif a.child == "tiny":
        child_tiny(*a.args)
    elif a.child == "tiny-parent":  # standalone: python benchmarks/bench_prep.py tiny-parent [NUM_DOCS]
        WORK.mkdir(parents=True, exist_ok=True)
        print(json.dumps(tiny_memory(*(int(x) for x in a.args)), indent=1))
    else:
        child_hf(*a.args)


if __name__ == "__main__":
    main()
