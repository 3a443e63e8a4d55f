"""The data card: `README.md` in the Hugging Face dataset-card form, derived from the manifest and the shards.

YAML front matter (so the Hub shows the splits), then Markdown: sources, tokenizer and fingerprint, options,
document accounting, token and fill statistics, length distributions with a plot (`card_lengths.png`
beside the card), and the commands that verify and inspect the data. The card is a pure function of
`manifest.json` and the shards' boundary columns: no timestamps, so repacking the same inputs gives the
same card, and `prep card DIR` rebuilds it at any time. The template lives in :data:`CARD_TEMPLATE`;
`data_cards/TEMPLATE.md` is a copy for readers (a test keeps the two equal).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from string import Template

import numpy as np

from prep.card_plot import card_figure
from prep.provenance import is_stdin
from prep.stats import SplitStats, dataset_stats, log2_histogram, summary
from shared.contract import CARD_NAME
from shared.errors import UserError
from shared.fileio import atomic_write_text, atomic_writer
from shared.manifest import CardInfo, Manifest
from shared.reader import PackedDataset

PLOT_NAME = "card_lengths.png"

CARD_TEMPLATE = """\
---
$front_matter
---

# Packed dataset `$name`

Token sequences packed by `$created_by` (format `$format` version $format_version) for causal-LM
training with variable-length attention. Every row lists its document boundaries (`cu_seqlens`),
position ids restart at 0 in every segment, the first token of every segment is not a target (label -100),
and every document ends with exactly one EOS. Rows are stored without padding.
$description
## Sources

| file | format | first doc_id | records | documents packed | tokens packed | sha256 |
| --- | --- | ---: | ---: | ---: | ---: | --- |
$inputs
$mixture
## Tokenizer

- path: `$tokenizer_path`
- fingerprint (sha256 of tokenizer.json): `$tokenizer_sha256`
- vocabulary: $vocab_size; EOS `$eos_token` = $eos_id; BOS: $bos

## Options

| seq_len | strategy | text field | long documents | val fraction | skip invalid |
| ---: | --- | --- | --- | ---: | --- |
$options

## Document accounting

`docs_in == packed + dropped + skipped`: $accounting_sum ($accounting_ok).

| read | packed | of which split | of which truncated | dropped (too long) | skipped empty | skipped missing field | skipped invalid |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
$accounting

Tokens (EOS/BOS included): $tokens_line

## Splits

| split | documents | fragmented | segments | rows | lower bound rows | tokens | target tokens | fill | shards |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
$splits

## Length distributions

| split | quantity | mean | min | p50 | p90 | p99 | max |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |
$lengths

![Document length, segments per row and row fill]($plot)

## Check and look

```bash
$commands
```
"""


CARD_KEYS = ("license", "language", "source_datasets", "description")
"""The card metadata `prep pack` takes, as the Hugging Face dataset card names them (and :class:`CardInfo`)."""
CARD_FLAGS = {
    "license": "--license",
    "language": "--language",
    "source_datasets": "--source-dataset",
    "description": "--description",
    "several": "repeating --language for each language",
}
"""How :func:`check_card_info` names the card metadata given as `prep pack` flags (and, under `several`, how
to give several languages)."""
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{2,8})*")


def check_card_info(info: CardInfo, names: Mapping[str, str] = CARD_FLAGS, where: str = "") -> None:
    """Light checks of what goes into the card's YAML: ids the Hugging Face Hub reads, not prose.

    ``names`` says how the message names each key (the flags, or a recipe's ``card.*`` keys) and ``where``
    prefixes it (the recipe), so the fix points at what the user wrote.
    """
    if info.license is not None and not LICENSE_ID.fullmatch(info.license):
        raise UserError(
            f"{where}{names['license']} {info.license!r} is not a license id. Pass an SPDX-style id in lower"
            " case, such as `apache-2.0`, `mit`, `cc-by-4.0` or `cc-by-nc-sa-4.0`, or `other` and name the"
            f" license in {names['description']}."
        )
    for code in info.language:
        if not LANGUAGE_CODE.fullmatch(code):
            raise UserError(
                f"{where}{names['language']} {code!r} is not a language code. Pass ISO 639-1 or 639-3 codes"
                f" in lower case (`en`, `de`, `yue`; a region may follow, `en-gb`), {names['several']}."
            )
    for name in info.source_datasets:
        if not name.strip() or "\n" in name:
            raise UserError(
                f"{where}{names['source_datasets']} {name!r} is empty or spans lines; pass one dataset name"
                f" (e.g. `reuters21578`, or a Hub id such as `org/name`) per {names['source_datasets']}."
            )
    if info.description is not None and not info.description.strip():
        raise UserError(
            f"{where}{names['description']} is empty; say what the data is, or drop {names['description']}."
        )


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "n>1M"


def _card_keys(m: Manifest) -> list[str]:
    """The Hugging Face card keys given to `prep pack` (license, language, source_datasets), as YAML lines."""
    c = m.card
    if c is None:
        return []
    lines = [f"license: {c.license}"] if c.license else []
    for key, values in (("language", c.language), ("source_datasets", c.source_datasets)):
        if values:
            # JSON strings are YAML double-quoted scalars: a name with `:` or `#` stays one string.
            lines += [f"{key}:"] + [f"  - {json.dumps(v)}" for v in values]
    return lines


def _front_matter(m: Manifest) -> str:
    lines = [
        *_card_keys(m),
        f"pretty_name: packed {m.options.strategy} seq_len {m.seq_len}",
        "task_categories:",
        "  - text-generation",
        "size_categories:",
        f"  - {_size_category(m.documents.packed)}",
        "tags:",
        "  - packed",
        "  - varlen",
        "  - causal-lm",
        "configs:",
        "  - config_name: default",
        "    data_files:",
    ]
    for name in m.splits:
        lines += [f"      - split: {name}", f'        path: "{name}-*.arrow"']
    t = m.tokenizer
    lines += [
        "packed_shards:",
        f"  format_version: {m.format_version}",
        f"  seq_len: {m.seq_len}",
        f"  strategy: {m.options.strategy}",
        f"  tokenizer_sha256: {t.sha256}",
        f"  eos_id: {t.eos_id}",
    ]
    return "\n".join(lines)


def _stat_row(split: str, what: str, values) -> str:
    s = summary(values)
    cells = " | ".join(f"{s[k]:,.2f}" if k == "mean" else f"{s[k]:,.0f}" for k in s)
    return f"| {split} | {what} | {cells} |"


def _card_options(m: Manifest) -> str:
    c = m.card
    if c is None:
        return ""
    given = [("--license", c.license), ("--description", c.description)]
    given += [("--language", v) for v in c.language] + [("--source-dataset", v) for v in c.source_datasets]
    return "".join(f" {flag} {shlex.quote(value)}" for flag, value in given if value)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


BAR_WIDTH = 40
"""Characters of a full (100%) bar in the card's mixture chart."""


def _mixture_section(m: Manifest) -> str:
    """The mixture as a table and a text bar chart of asked against achieved shares; empty for a plain pack."""
    if m.mixture is None:
        return ""
    x = m.mixture
    rows, bars = [], []
    width = max(len(s.name) for s in x.sources)
    for s in x.sources:
        asked = f"{s.share:.2%}" if s.share is not None else f"{s.epochs:g} epochs"
        rows.append(
            f"| {s.name} | {asked} | {s.achieved_share:.2%} | {s.docs_in:,} | {s.docs_packed:,}"
            f" | {s.docs_repeated:,} | {s.docs_left_out:,} | {s.tokens_in:,} | {s.train_tokens:,}"
            f" | {s.val_tokens:,} | {s.tokens_repeated:,} | {s.tokens_left_out:,} |"
        )
        if s.share is not None:
            bars.append(
                f"{s.name:<{width}}  asked {'#' * round(s.share * BAR_WIDTH):<{BAR_WIDTH}} {s.share:7.2%}"
            )
        got = f"{'=' * round(s.achieved_share * BAR_WIDTH):<{BAR_WIDTH}} {s.achieved_share:7.2%}"
        bars.append(f"{'' if s.share is not None else s.name:<{width}}  got   {got}")
    total = f"{x.total_tokens:,}" if x.total_tokens is not None else "the most the cap allows"
    return "\n".join(
        [
            "",
            "## Mixture",
            "",
            f"Sources mixed to shares of the `train` tokens by whole documents (seed {x.seed}, at most"
            f" {x.max_epochs:g} epochs of any source, total: {total}). Per source"
            " `docs_in == packed + left out`; repeats are further copies (`train` only), stored under"
            " `doc_id + copy * docs_in`. The plot's last panel draws the asked and achieved shares.",
            "",
            "| source | asked | achieved | docs in | packed | repeated | left out | tokens in | train tokens"
            " | val tokens | tokens repeated | tokens left out |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            "```",
            *bars,
            "```",
            "",
        ]
    )


def _pack_inputs(m: Manifest) -> str:
    """The inputs of the repack command: the files, or a mixture's sources as `--source` options."""
    if m.mixture is None:
        return " ".join(shlex.quote(i.path) for i in m.inputs)
    x = m.mixture
    specs = []
    for s in x.sources:
        amount = f"share={s.share:g}" if s.share is not None else f"epochs={s.epochs:g}"
        spec = f"{s.name}={','.join(s.inputs)}:{amount}:text_field={s.text_field}"
        specs.append(f"--source {shlex.quote(spec)}")
    specs.append(f"--max-epochs {x.max_epochs:g} --mix-seed {x.seed}")
    if x.total_tokens is not None:
        specs.append(f"--total-tokens {x.total_tokens}")
    return " ".join(specs)


def _commands(folder: str, m: Manifest) -> str:
    d = shlex.quote(folder)
    # Standard input cannot be given again: then the sources are not compared.
    stdin = any(is_stdin(i.path) for i in m.inputs)
    sources = "" if stdin else " ".join(f"--source {shlex.quote(i.path)}" for i in m.inputs)
    o, t = m.options, m.tokenizer
    repack = (
        f"prep pack {_pack_inputs(m)} --tokenizer {shlex.quote(t.path)}"
        f" --out {d} --seq-len {o.seq_len} --strategy {o.strategy} --text-field {shlex.quote(o.text_field)}"
        f" --long-docs {o.long_docs} --val-fraction {o.val_fraction} --eos-token {shlex.quote(t.eos_token)}"
        + (f" --bos-token {shlex.quote(t.bos_token)}" if t.bos_token else "")
        + (" --skip-invalid" if o.skip_invalid else "")
        + (f" --dataset-split {shlex.quote(o.dataset_split)}" if o.dataset_split else "")
        + _card_options(m)
        + _chat_flags(m)
    )
    return "\n".join(
        [
            "# how it was made (add --overwrite to replace this folder)",
            repack,
            "# check every row, the tokenizer fingerprint, and a re-tokenized sample of the sources",
            f"prep verify {d} --tokenizer {shlex.quote(m.tokenizer.path)} {sources}",
            "# the summary, and row 0 with its segments, tokens and attention mask",
            f"prep inspect {d} --row 0 --png row0.png",
            "# rebuild this card",
            f"prep card {d}",
        ]
    )


def _chat_flags(m: Manifest) -> str:
    o = m.options
    if not o.masked_labels:
        return ""
    flags = f" --long-chats {o.long_chats}" + (f" --format {o.format}" if o.format != "mixed" else "")
    if o.train_on:
        flags += "".join(f" --train-on {shlex.quote(r)}" for r in o.train_on.split(","))
    return flags


def render_card(m: Manifest, stats: dict[str, SplitStats], folder: str = "DIR") -> str:
    d, o, t = m.documents, m.options, m.tokenizer
    splits, lengths = [], []
    for name, s in m.splits.items():
        st = stats[name]
        fill = s.num_tokens / max(1, s.num_rows * o.seq_len)
        lower = -(-s.num_tokens // o.seq_len)
        splits.append(
            f"| {name} | {s.num_docs:,} | {st.num_fragmented_docs:,} | {s.num_segments:,} | {s.num_rows:,}"
            f" | {lower:,} | {s.num_tokens:,} | {s.num_target_tokens:,} | {fill:.4%} | {len(s.shards)} |"
        )
        lengths += [
            _stat_row(name, "tokens per document", st.doc_len),
            _stat_row(name, "segments per document", st.segs_per_doc),
            _stat_row(name, "tokens per row", st.row_len),
            _stat_row(name, "segments per row", st.segs_per_row),
        ]
    problems = d.problems()
    return Template(CARD_TEMPLATE).substitute(
        front_matter=_front_matter(m),
        name=Path(folder).name,
        created_by=m.created_by,
        format=m.format,
        format_version=m.format_version,
        description=f"\n## Description\n\n{m.card.description.strip()}\n"
        if m.card and m.card.description
        else "",
        mixture=_mixture_section(m),
        inputs="\n".join(
            f"| `{i.path}`{f' (split {i.dataset_split})' if i.dataset_split else ''} | {i.format}"
            f" | {i.first_doc_id:,} | {i.num_records:,} | {_count(i.num_docs)} | {_count(i.num_tokens)}"
            f" | {f'`{i.sha256}`' if i.sha256 else '-'} |"
            for i in m.inputs
        ),
        tokenizer_path=t.path,
        tokenizer_sha256=t.sha256,
        vocab_size=f"{t.vocab_size:,}",
        eos_token=t.eos_token,
        eos_id=t.eos_id,
        bos=f"`{t.bos_token}` = {t.bos_id}" if t.bos_token else "none",
        options=f"| {o.seq_len:,} | {o.strategy} | `{o.text_field}` | {o.long_docs} | {o.val_fraction} | {o.skip_invalid} |",
        accounting_sum=f"{d.docs_in:,} == {d.packed:,} + {d.dropped:,} + {d.skipped:,}",
        accounting_ok="holds" if not problems else "DOES NOT HOLD: " + "; ".join(problems),
        accounting=f"| {d.docs_in:,} | {d.packed:,} | {d.split:,} | {d.truncated:,} | {d.dropped:,}"
        f" | {d.skipped_empty:,} | {d.skipped_missing_field:,} | {d.skipped_invalid:,} |",
        tokens_line=f"{d.tokens_in:,} in, {d.tokens_packed:,} packed, {d.tokens_truncated:,} cut by truncation,"
        f" {d.tokens_dropped:,} in dropped documents.",
        splits="\n".join(splits),
        lengths="\n".join(lengths),
        plot=PLOT_NAME,
        commands=_commands(folder, m),
    ) + chat_section(m, stats)


def chat_section(m: Manifest, stats: dict[str, SplitStats]) -> str:
    """The card's account of a pack of conversations or pairs: what was rendered, the share of tokens
    learnt, and conversations per length; nothing for a plain pack (its card keeps its bytes)."""
    o, d = m.options, m.documents
    if not o.masked_labels:
        return ""
    lines = [
        "",
        "## Conversations",
        "",
        f"Records: `{o.format}`. Targets: "
        + (
            f"the turns of `{o.train_on}` and each turn's closing token (the EOS after a conversation is not one)"
            if o.train_on
            else "each completion and its EOS"
        )
        + "; every other label is -100.",
        "",
        f"Chat template: `{o.chat_template}`. Longer than a row (`--long-chats {o.long_chats}`):"
        f" {d.dropped:,} dropped, {d.truncated:,} truncated after their last whole trained turn.",
        "",
        "| split | tokens | target tokens | share |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, s in m.splits.items():
        lines.append(
            f"| {name} | {s.num_tokens:,} | {s.num_target_tokens:,} | {s.num_target_tokens / max(1, s.num_tokens):.2%} |"
        )
    lines += ["", "Conversations per length (tokens, EOS included; all splits):", ""]
    lines += ["| tokens | conversations |", "| --- | ---: |"]
    doc_len = np.concatenate([st.doc_len for st in stats.values()] or [np.zeros(0, np.int64)])
    lines += [f"| {lo:,}-{hi - 1:,} | {count:,} |" for lo, hi, count in log2_histogram(doc_len) if count]
    return "\n".join(lines) + "\n"


def is_card_of(path: Path, manifest: Manifest) -> bool:
    """Whether ``path`` is a card written for ``manifest``: it starts with the front matter rendered from it
    (which names the tokenizer fingerprint and the options), so `--overwrite` may replace it."""
    head = f"---\n{_front_matter(manifest)}\n---\n".encode()
    try:
        with open(path, "rb") as f:
            return f.read(len(head)) == head
    except OSError:
        return False


def write_card(folder: str | Path, manifest: Manifest | None = None) -> Path:
    """Write ``README.md`` and ``card_lengths.png`` into the dataset ``folder``; return the card's path."""
    ds = PackedDataset(folder)
    manifest = manifest or ds.manifest
    stats = dataset_stats(ds)
    folder = Path(folder)
    with atomic_writer(folder / PLOT_NAME) as f:
        card_figure(stats, f, manifest.mixture)
    path = folder / CARD_NAME
    atomic_write_text(path, render_card(manifest, stats, str(folder)))
    return path
