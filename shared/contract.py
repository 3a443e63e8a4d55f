"""The packed-shard contract: column names, dtypes, Arrow schema, format version and metadata keys.

Both halves of the product import this module; it is the only place the format is defined.

A packed row holds one or more *segments*. A segment is one whole document, or one fragment of a
document longer than ``seq_len``. For a row holding documents A (3 tokens + EOS) and B (2 tokens + EOS)::

    input_ids     a0   a1   a2   EOS  | b0   b1   EOS
    labels        -100 a1   a2   EOS  | -100 b1   EOS
    position_ids  0    1    2    3    | 0    1    2
    cu_seqlens    [0, 4, 7]
    doc_ids       [id(A), id(B)]

Labels are unshifted (the Hugging Face convention: the model shifts them). The first token of every
segment is never a target, so no token is predicted from another document. Each document carries exactly
one EOS, as the last token of its last segment; the EOS is a target. Rows are stored without padding.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

FORMAT_NAME = "packed-shards"
FORMAT_VERSION = 1

IGNORE_INDEX = -100
"""Label value that marks a position as "not a target" (PyTorch cross-entropy's default ``ignore_index``)."""

INPUT_IDS = "input_ids"
LABELS = "labels"
POSITION_IDS = "position_ids"
CU_SEQLENS = "cu_seqlens"
DOC_IDS = "doc_ids"

TOKEN_COLUMNS = (INPUT_IDS, LABELS, POSITION_IDS)
"""Columns with one value per token; all three have the same length in every row."""

SCHEMA_METADATA_KEY = b"packed_shards"
"""Key of the JSON blob in each shard's Arrow schema metadata (see :func:`shard_metadata`)."""

MANIFEST_NAME = "manifest.json"
CARD_NAME = "README.md"
SPLITS = ("train", "val")
SHARD_SUFFIX = ".arrow"

SHARD_SCHEMA = pa.schema(
    [
        pa.field(INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(LABELS, pa.list_(pa.int32()), nullable=False),
        pa.field(POSITION_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(CU_SEQLENS, pa.list_(pa.int32()), nullable=False),
        pa.field(DOC_IDS, pa.list_(pa.int64()), nullable=False),
    ]
)
"""Schema of every shard, without metadata. Compare with ``schema.remove_metadata()``."""


def shard_file_name(split: str, index: int, num_shards: int) -> str:
    """``train-00003-of-00012.arrow``: sortable, and says how many siblings to expect."""
    return f"{split}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def shard_metadata(
    *,
    split: str,
    seq_len: int,
    strategy: str,
    eos_id: int,
    bos_id: int | None,
    tokenizer_sha256: str,
    vocab_size: int,
) -> dict[str, Any]:
    """The facts a single shard carries about itself, so that a lone file can still be checked."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "split": split,
        "seq_len": seq_len,
        "strategy": strategy,
        "eos_id": eos_id,
        "bos_id": bos_id,
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": vocab_size,
    }


def schema_with_metadata(metadata: dict[str, Any]) -> pa.Schema:
    return SHARD_SCHEMA.with_metadata({SCHEMA_METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_schema_metadata(schema: pa.Schema) -> dict[str, Any] | None:
    """The shard's metadata blob, or ``None`` when the schema does not carry one."""
    raw = (schema.metadata or {}).get(SCHEMA_METADATA_KEY)
    if raw is None:
        return None
    return json.loads(raw)
