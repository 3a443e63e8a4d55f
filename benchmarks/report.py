"""Render the benchmark results (the dict run_all.py builds) as BENCHMARKS.md: targets first, then details."""

from __future__ import annotations

from pathlib import Path

from report_gpu import render_gpu

NOTES = Path(__file__).with_name("NOTES.md")
"""Hand-written analysis (why a target is missed, what would close it), appended to the generated report."""


def _x(v: float) -> str:
    return f"{v:.2f}x"


Row = tuple[str, str, str, str, bool | None]
"""(figure, measured, target, ratio, met): one row of the targets table."""


def _targets(r: dict) -> list[Row]:
    """The targets table's rows for every result present."""
    return _prep_targets(r) + _memory_targets(r) + _train_targets(r)


def _prep_targets(r: dict) -> list[Row]:
    rows = []
    for corpus in ("reuters", "ectsum"):
        p = r.get(f"prep_{corpus}")
        if not p:
            continue
        rows.append(
            (
                f"prep pack vs tokenizers alone, {corpus}",
                f"{p['ours']['seconds']:.1f}s vs {p['reference_tokenizers']['seconds']:.1f}s",
                ">= 2.5x",
                _x(p["speedup_vs_tokenizers"]),
                p["speedup_vs_tokenizers"] >= 2.5,
            )
        )
        rows.append(
            (
                f"prep pack vs HF datasets+trl pipeline, {corpus}",
                f"{p['ours']['seconds']:.1f}s vs {p['hf_pipeline']['seconds']:.1f}s",
                ">= 4x",
                _x(p["speedup_vs_hf"]),
                p["speedup_vs_hf"] >= 4,
            )
        )
        rows.append(
            (
                f"token ids identical to tokenizers, {corpus}",
                "yes" if p["ids_identical"] else "NO",
                "identical",
                "",
                p["ids_identical"],
            )
        )
        if "jsonl_gz" in p:
            rows.append(_gz_target(corpus, p))
        rows.append(
            (
                f"share of wall time packing, {corpus}",
                f"{p['packing_share']:.1%}",
                "< 5%",
                "",
                p["packing_share"] < 0.05,
            )
        )
    return rows


def _gz_target(corpus: str, p: dict) -> Row:
    gz = p["jsonl_gz"]
    same = "same shards" if gz["shards_identical"] else "SHARDS DIFFER"
    return (
        f"prep pack on .jsonl.gz vs the plain .jsonl, {corpus}",
        f"{gz['ours']['seconds']:.1f}s vs {p['ours']['seconds']:.1f}s, {same}",
        "<= 1.15x, same shards",
        _x(gz["time_ratio"]),
        gz["time_ratio"] <= 1.15 and gz["shards_identical"],
    )


def _memory_targets(r: dict) -> list[Row]:
    rows = []
    m = r.get("memory")
    if m:
        f = m["factor"]
        rows.append(
            (
                f"peak RSS of prep pack, Reuters x{f} vs x1",
                f"{m[f'{f}x']['peak_rss_mib']:.0f} vs {m['1x']['peak_rss_mib']:.0f} MiB",
                "<= 1.5x",
                _x(m["growth"]),
                m["growth"] <= 1.5,
            )
        )
    mt = r.get("memory_tiny")
    if mt:
        rows.append(
            (
                f"peak RSS, {mt['num_docs'] / 1e6:.0f}M tiny documents",
                f"{mt['peak_gb']:.2f} GB (main process +{mt['bytes_per_doc']:.1f} B per document)",
                f"<= {mt['target_gb']} GB",
                "",
                mt["peak_gb"] <= mt["target_gb"],
            )
        )
    return rows


def _train_targets(r: dict) -> list[Row]:
    rows = []
    lo = r.get("loader")
    if lo:
        for label, v in lo.items():
            rows.append(
                (
                    f"loader tokens/s ({label} dataset)",
                    f"{v['loader_tokens_per_s'] / 1e6:.1f} M/s",
                    ">= 50 M/s",
                    "",
                    v["loader_tokens_per_s"] >= 50e6,
                )
            )
    t = r.get("train_step")
    if t:
        rows.append(
            (
                "train step real tokens/s, packed vs padded (Reuters, 1024)",
                f"{t['packed_tokens_per_s']:,.0f} vs {t['padded_tokens_per_s']:,.0f}",
                ">= 1.8x",
                _x(t["speedup"]),
                t["speedup"] >= 1.8,
            )
        )
    lm = r.get("loss_memory")
    if lm:
        c = lm["chunked"][str(lm["target_tokens"])]["peak_added_mib"]
        rows.append(
            (
                f"loss peak memory at {lm['target_tokens']:,} tokens, chunked vs naive ({lm['naive_at_target']})",
                f"{c:,.0f} vs {lm['naive_at_target_mib']:,.0f} MiB",
                "<= 0.25x",
                _x(lm["ratio_at_target"]),
                lm["ratio_at_target"] <= 0.25,
            )
        )
    ls = r.get("loss_speed")
    if ls:
        m = ls["median_seconds"]
        rows.append(
            (
                f"loss forward + backward, fused vs checkpointed ({ls['num_tokens']:,} x {ls['dim']}, frozen head)",
                f"{m['fused']:.2f} vs {m['checkpointed']:.2f} s",
                ">= 1.3x",
                _x(ls["speedup"]),
                ls["speedup"] >= 1.3,
            )
        )
    return rows


def _machine(r: dict) -> list[str]:
    m = r["machine"]
    return [
        f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB RAM, no GPU",
        f"- {m['os']}; Python {m['python']}, numpy {m['numpy']}, tokenizers {m['tokenizers']},"
        f" tiktoken {m['tiktoken']}, torch {m['torch']}",
        f"- load average (1/5/15 min) at start {m['load_average_at_start']}, at end {r.get('load_average_at_end')}:"
        " the box is shared with other engineers' jobs; anything above ~2 means the figures were measured"
        " under contention (each side of a ratio ran in the same conditions, one after the other)",
        f"- started {r['started']}, total {r['total_seconds'] / 60:.1f} min",
        *_reruns(r),
    ]


def _reruns(r: dict) -> list[str]:
    """A group measured again later on its own (`merge_rerun`): which sections, when, and under what load."""
    return [
        f"- rerun by `{x['command']}` (sections {', '.join(x['sections'])}): started {x['started']},"
        f" load average at start {x['load_average_at_start']}, at end {x['load_average_at_end']}; each"
        " ratio of those sections compares measurements of that rerun only"
        for x in r.get("reruns", [])
    ]


def merge_rerun(r: dict, rerun: dict) -> dict:
    """``r`` with the sections ``rerun`` (a `run_all.py --only ...` results.json) measured again."""
    sections = [k for k in rerun if k not in META_KEYS]
    entry = {
        "command": rerun["command"],
        "sections": sections,
        "started": rerun["started"],
        "load_average_at_start": rerun["machine"]["load_average_at_start"],
        "load_average_at_end": rerun.get("load_average_at_end"),
    }
    merged = {**r, **{k: rerun[k] for k in sections}}
    merged["reruns"] = [x for x in r.get("reruns", []) if not set(x["sections"]) <= set(sections)] + [entry]
    return merged


META_KEYS = ("command", "machine", "started", "total_seconds", "load_average_at_end", "errors", "reruns")
"""results.json keys that describe a run rather than hold a section's figures."""


def _runs_line(p: dict) -> list[str]:
    """Every run's time, where a side ran more than once (the table shows each side's median run)."""
    if p.get("repeats", 1) < 2:
        return []
    sides = [("`prep pack`", p["ours"]), ("(a)", p["reference_tokenizers"]), ("(b)", p["hf_pipeline"])]
    if "jsonl_gz" in p:
        sides.append(("`.jsonl.gz`", p["jsonl_gz"]["ours"]))
    times = "; ".join(
        f"{label} " + ", ".join(f"{t:.2f}" for t in side["runs_seconds"]) for label, side in sides
    )
    return [
        f"Each side ran {p['repeats']} times, interleaved, in a rotating order; the table shows each side's"
        f" median run, and the ratios compare medians. All runs (s): {times}.",
        "",
    ]


def _gz_row(p: dict) -> list[str]:
    if "jsonl_gz" not in p:
        return []
    gz = p["jsonl_gz"]
    o = gz["ours"]
    size = f"{gz['compressed_bytes'] / 2**20:.1f} MiB gzipped from {gz['plain_bytes'] / 2**20:.1f} MiB"
    return [
        f"| `prep pack` on the same file as `.jsonl.gz` ({size}) | {o['seconds']:.2f} | {o['num_tokens'] / o['seconds']:,.0f} | {o['peak_rss_mib']:.0f} |"
    ]


def _prep_section(p: dict) -> list[str]:
    o, ref, hf = p["ours"], p["reference_tokenizers"], p["hf_pipeline"]
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in o["phases"].items())
    hf_phases = ", ".join(f"{k} {v:.2f}s" for k, v in hf["phases"].items())
    lines = [
        f"### {p['corpus']}: {ref['num_docs']:,} documents, {ref['num_tokens']:,} tokens",
        "",
        "| run | seconds | tokens/s | peak RSS (MiB, process tree) |",
        "| --- | ---: | ---: | ---: |",
        f"| `prep pack` (read, tokenize, pack, write, manifest, card) | {o['seconds']:.2f} | {o['num_tokens'] / o['seconds']:,.0f} | {o['peak_rss_mib']:.0f} |",
        f"| (a) `tokenizers` `encode_batch_fast` alone, texts in memory | {ref['seconds']:.2f} | {ref['num_tokens'] / ref['seconds']:,.0f} | {ref['peak_rss_mib']:.0f} |",
        f"| (b) `datasets` map + `trl.pack_dataset(bfd_split)` + `save_to_disk` | {hf['seconds']:.2f} | {hf['num_tokens'] / hf['seconds']:,.0f} | {hf['peak_rss_mib']:.0f} |",
        *_gz_row(p),
        "",
        *_runs_line(p),
        f"`prep pack` phases: {phases}. Engine notices: {o['notices'] or 'none (the tiktoken engine ran, every batch checked)'}.",
        f"HF pipeline phases: {hf_phases}.",
        "",
        "| packing | rows | lower bound | excess | planning time |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, q in p["packing"].items():
        plan = f"{q['plan_seconds']:.2f}s" if "plan_seconds" in q else "(in the HF pack phase)"
        lines.append(f"| {name} | {q['rows']:,} | {q['lower_bound']:,} | {q['excess']:.2%} | {plan} |")
    lines += ["", "Lower bound = ceil(tokens / seq_len); trl's count has no EOS per document, ours has one."]
    return lines + [""]


def _memory_section(r: dict) -> list[str]:
    lines: list[str] = []
    m, f = r["memory"], r["memory"]["factor"]
    lines += [
        "## Memory of `prep pack` as the corpus grows",
        "",
        "| corpus | input MiB | tokens | seconds | peak RSS, process tree (MiB) | peak RSS, main process (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in ("1x", f"{f}x"):
        v = m[label]
        lines.append(
            f"| Reuters {label} | {m['input_bytes'][label] / 2**20:.0f} | {v['num_tokens']:,} | {v['seconds']:.1f} | {v['peak_rss_mib']:.0f} | {v['self_peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        f"Reuters x{f}: every document repeated {f} times with a copy tag, generated into benchmarks/_work.",
        "",
    ]
    return lines


def _memory_tiny_section(r: dict) -> list[str]:
    lines: list[str] = []
    mt = r["memory_tiny"]
    lines += [
        "## Memory of `prep pack` per document (tiny documents, sample tokenizer, bfd at 1024)",
        "",
        "| documents | tokens | seconds | peak RSS, process tree (MiB) | peak RSS, main process (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in (mt["small"], mt["num_docs"]):
        v = mt["runs"][str(n)]
        lines.append(
            f"| {n:,} | {v['num_tokens']:,} | {v['seconds']:.1f} | {v['peak_rss_mib']:.0f} | {v['self_peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        f'Each document is one line like `{{"text": "a b 17"}}`. The main process\'s peak (planning, or the'
        f" card) grows by {mt['bytes_per_doc']:.1f} bytes per document between the two runs; the smaller"
        " run's tree peak is the tokenizing workers', which hold batches, not documents.",
        "",
    ]
    return lines


def _loader_section(r: dict) -> list[str]:
    lines: list[str] = []
    lines += [
        "## Loader (CPU, batch of 8 rows of up to 1024 tokens)",
        "",
        "| dataset | shards MiB | time to first batch | Loader tokens/s | assembly alone tokens/s | RSS after open / end (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, v in r["loader"].items():
        lines.append(
            f"| {label} | {v['dataset_mib']:.0f} | {v['time_to_first_batch_s']:.2f}s | {v['loader_tokens_per_s'] / 1e6:.1f} M | {v['assemble_tokens_per_s'] / 1e6:.1f} M | {v['rss_after_open_mib']:.0f} / {v['rss_end_mib']:.0f} |"
        )
    runs = {label: v.get("runs_loader_tokens_per_s", []) for label, v in r["loader"].items()}
    if all(len(x) > 1 for x in runs.values()):
        listed = "; ".join(f"{label} " + ", ".join(f"{t / 1e6:.1f}" for t in x) for label, x in runs.items())
        lines += [
            "",
            f"Each dataset's median run of {len(next(iter(runs.values())))}, interleaved; loader M tokens/s"
            f" of all runs: {listed}.",
        ]
    lines += [
        "",
        "On CPU there is nothing to pin (pinning needs CUDA); assembly alone is the loader's own gather (`Split.views` + `_stage`) into one preallocated int32 host buffer set without the prefetch thread, the work the CUDA path does into pinned ones.",
        "",
    ]
    return lines


def _train_step_section(r: dict) -> list[str]:
    lines: list[str] = []
    t = r["train_step"]
    lines += [
        "## Training step on CPU, tiny Qwen2 (vocab 151,936), Reuters packed at 1024",
        "",
        "| run | real tokens | positions computed | seconds | real tokens/s |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| packed varlen (cu_seqlens, per-segment SDPA reference) | {t['real_tokens']:,} | {t['real_tokens']:,} | {t['packed_seconds']:.1f} | {t['packed_tokens_per_s']:,.0f} |",
        f"| padded, one document per row, HF SDPA with padding mask | {t['real_tokens']:,} | {t['padded_positions']:,} | {t['padded_seconds']:.1f} | {t['padded_tokens_per_s']:,.0f} |",
        "",
        f"Same {t['num_docs']} documents (the segments of the packed micro-batches), same chunked loss,"
        f" AdamW step included; padding is {t['padding_share']:.0%} of the padded positions.",
        "",
    ]
    return lines


def _loss_memory_section(r: dict) -> list[str]:
    lines: list[str] = []
    lm = r["loss_memory"]
    lines += [
        f"## Loss memory over a {lm['vocab']:,}-token vocabulary (fp32, forward + backward, peak RSS added)",
        "",
        "| tokens | chunked, fused (MiB) | chunked, checkpointed (MiB) | naive full logits (MiB) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for t in sorted({*lm["chunked"], *lm["naive"]}, key=int):
        c = lm["chunked"].get(t, {}).get("peak_added_mib")
        k = lm.get("checkpointed", {}).get(t, {}).get("peak_added_mib")
        n = lm["naive"].get(t, {}).get("peak_added_mib")
        if int(t) == lm["target_tokens"] and n is None:
            n_text = f"{lm['naive_at_target_mib']:,.0f} (extrapolated, linear in T)"
        else:
            n_text = f"{n:,.0f}" if n is not None else "-"
        c_text, k_text = (f"{v:,.0f}" if v is not None else "-" for v in (c, k))
        lines.append(f"| {int(t):,} | {c_text} | {k_text} | {n_text} |")
    lines += [""]
    return lines


def _loss_speed_section(r: dict) -> list[str]:
    ls = r["loss_speed"]
    runs = {name: ", ".join(f"{s:.2f}" for s in v) for name, v in ls["seconds"].items()}
    return [
        f"## Loss speed: {ls['num_tokens']:,} tokens, hidden {ls['dim']}, vocabulary {ls['vocab']:,}"
        " (fp32, forward + backward, frozen head as with LoRA)",
        "",
        "| loss | median seconds | all runs (s) |",
        "| --- | ---: | --- |",
        f"| fused (head and cross-entropy in one pass, gradients in the forward) | {ls['median_seconds']['fused']:.2f} | {runs['fused']} |",
        f"| checkpointed (logits recomputed in the backward) | {ls['median_seconds']['checkpointed']:.2f} | {runs['checkpointed']} |",
        "",
        f"Fused is {_x(ls['speedup'])} the checkpointed path's speed; the two ran in one process, {ls['repeats']}"
        f" times each, alternating which went first. Loss relative difference {ls['loss_relative_difference']:.1e},"
        f" hidden-gradient difference {ls['grad_relative_difference']:.1e} of its largest entry.",
        "",
    ]


def render(r: dict) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{r['command']}` (one invocation; every ratio compares measurements from it, and the"
        " prep ratios compare the medians of interleaved repeated runs"
        + ("; sections rerun later are listed under Machine)." if r.get("reruns") else ")."),
        "Benchmarks are not tests: nothing here asserts on time. This machine has no GPU: the GPU figures"
        " (last section) come from `benchmarks/gpu_check.sh` runs on a lent GPU machine, kept in"
        " `benchmarks/gpu/`.",
        "",
        "## Machine",
        "",
        *_machine(r),
        "",
        "## Targets",
        "",
        "| figure | measured | target | ratio | met |",
        "| --- | --- | --- | ---: | :---: |",
    ]
    for figure, measured, target, ratio, met in _targets(r):
        lines.append(f"| {figure} | {measured} | {target} | {ratio} | {'yes' if met else '**no**'} |")
    lines += ["", "## Prep throughput and packing", ""]
    for corpus in ("reuters", "ectsum"):
        if f"prep_{corpus}" in r:
            lines += _prep_section(r[f"prep_{corpus}"])
    if "memory" in r:
        lines += _memory_section(r)
    if "memory_tiny" in r:
        lines += _memory_tiny_section(r)
    if "loader" in r:
        lines += _loader_section(r)
    if "train_step" in r:
        lines += _train_step_section(r)
    if "loss_memory" in r:
        lines += _loss_memory_section(r)
    if "loss_speed" in r:
        lines += _loss_speed_section(r)
    lines += render_gpu()
    if NOTES.exists():
        lines += [NOTES.read_text(encoding="utf-8").rstrip(), ""]
    return "\n".join(lines)
