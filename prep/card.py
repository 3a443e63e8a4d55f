"""The data card: `README.md` in the Hugging Face dataset-card form, derived from the manifest alone.

Because it is a pure function of `manifest.json`, `prep card DIR` can rebuild it at any time and two packs of
the same inputs give the same card.
"""

from __future__ import annotations

from pathlib import Path

from shared.contract import CARD_NAME, FORMAT_VERSION
from shared.fileio import atomic_write_text
from shared.manifest import Manifest


def _front_matter(m: Manifest) -> str:
    lines = [
        "---",
        "pretty_name: packed shards",
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
    lines.append("---")
    return "\n".join(lines)


def render_card(m: Manifest, folder_name: str = "DIR") -> str:
    d, o, t = m.documents, m.options, m.tokenizer
    split_rows = []
    for name, s in m.splits.items():
        fill = s.num_tokens / max(1, s.num_rows * o.seq_len)
        lower = -(-s.num_tokens // o.seq_len)
        split_rows.append(
            f"| {name} | {s.num_docs:,} | {s.num_segments:,} | {s.num_rows:,} | {lower:,} | {s.num_tokens:,}"
            f" | {s.num_target_tokens:,} | {fill:.4%} | {len(s.shards)} |"
        )
    inputs = "\n".join(
        f"| `{i.path}` | {i.format} | {i.first_doc_id:,} | {i.num_records:,} |" for i in m.inputs
    )
    accounting_ok = "holds" if not d.problems() else "DOES NOT HOLD: " + "; ".join(d.problems())
    return f"""{_front_matter(m)}

# Packed dataset

Token sequences packed by `{m.created_by}` (format `{m.format}` version {FORMAT_VERSION}) for causal-LM
training with variable-length attention: every row lists its document boundaries (`cu_seqlens`), position
ids restart at 0 in every segment, and the first token of every segment is not a target (label -100).

## Sources

| file | format | first doc_id | records |
| --- | --- | ---: | ---: |
{inputs}

## Tokenizer

- path: `{t.path}`
- fingerprint (sha256 of tokenizer.json): `{t.sha256}`
- vocabulary: {t.vocab_size:,}; EOS `{t.eos_token}` = {t.eos_id}; BOS: {f"`{t.bos_token}` = {t.bos_id}" if t.bos_token else "none"}

## Options

| seq_len | strategy | text field | long documents | val fraction | skip invalid |
| ---: | --- | --- | --- | ---: | --- |
| {o.seq_len:,} | {o.strategy} | `{o.text_field}` | {o.long_docs} | {o.val_fraction} | {o.skip_invalid} |

## Document accounting

`docs_in == packed + dropped + skipped`: {d.docs_in:,} == {d.packed:,} + {d.dropped:,} + {d.skipped:,} ({accounting_ok}).

| read | packed | of which split | of which truncated | dropped (too long) | skipped empty | skipped missing field | skipped invalid |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| {d.docs_in:,} | {d.packed:,} | {d.split:,} | {d.truncated:,} | {d.dropped:,} | {d.skipped_empty:,} | {d.skipped_missing_field:,} | {d.skipped_invalid:,} |

Tokens (EOS/BOS included): {d.tokens_in:,} in, {d.tokens_packed:,} packed, {d.tokens_truncated:,} cut by
truncation, {d.tokens_dropped:,} in dropped documents.

## Splits

| split | documents | segments | rows | lower bound rows | tokens | target tokens | fill | shards |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(split_rows)}

## Check and look

```bash
prep verify {folder_name}
prep inspect {folder_name} --row 0
```
"""


def write_card(folder: str | Path, manifest: Manifest) -> Path:
    folder = Path(folder)
    path = folder / CARD_NAME
    atomic_write_text(path, render_card(manifest, folder.name))
    return path
