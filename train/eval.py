"""Evaluation: loss, perplexity and bits per byte of a model on packed rows or on whole documents.

Packed (the default, and what `train run` evaluates): every row runs through the same varlen forward
as training (`train.loss.micro_batch_loss_sum`, attention confined to ``cu_seqlens``), and the loss is
the NLL summed over every target token, divided by their count. A document longer than a row was cut
into fragments by `prep pack`; each fragment is scored with its own tokens as context only, and its
first token is not a target (its label is -100). So packed perplexity is the perplexity of the rows as
the model trains on them, which for long documents is higher than with full context::

    document  d0 d1 d2 d3 d4 d5 d6 EOS        cut at seq_len 4 into two fragments
    packed    [d0 d1 d2 d3] [d4 d5 d6 EOS]    targets d1 d2 d3 | d5 d6 EOS  (d4 unscored, d5 sees d4 only)

Document-level (:func:`evaluate_documents`): each document is rebuilt from its fragments (they are in
storage order; see :func:`read_documents`) and scored in windows of at most ``window`` tokens that
start every ``stride`` tokens, like lm-evaluation-harness's rolling log-likelihood and the strided
perplexity of the transformers docs. Every token but the document's first is scored exactly once, in
the first window that holds it (never at that window's start: ``stride < window``), so with at least
``window - stride`` tokens of context (all earlier tokens near the document's start)::

    window 6, stride 3:   [d0 d1 d2 d3 d4 d5]             scores d1..d5
                                   [d3 d4 d5 d6 EOS]      scores d6 EOS (d3..d5 are context)

Bits per byte: the same NLL sum in bits over the UTF-8 bytes of the target tokens,
``nll_sum / ln 2 / num_bytes``. A token's bytes are those the tokenizer's byte-level decoder gives it
(:func:`token_byte_lengths`), so the bytes of a whole document's tokens are the bytes of its text as
the tokenizer saw it (after its normalizer, NFC for Qwen2.5). Special tokens (the EOS and BOS that
`prep pack` places) count 0 bytes: their NLL is in the sum, as in the loss, but they add no text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from shared.contract import IGNORE_INDEX
from shared.errors import UserError
from shared.fileio import sha256_file
from shared.manifest import Manifest
from shared.reader import PackedRow, Split
from train.batch import VarlenBatch
from train.hardware import sum_dtype
from train.loader import batch_from_rows, sequential_batches
from train.loss import micro_batch_loss_sum
from train.parallel import all_reduce_sum, dist_info


class EvalError(UserError):
    """An evaluation option or input is invalid."""


@dataclass(frozen=True, slots=True)
class EvalFigures:
    """What one model scored on one eval set: sums first, so that figures combine exactly."""

    nll_sum: float
    """Cross-entropy in nats, summed over every target token."""
    num_targets: int
    num_bytes: int | None
    """UTF-8 bytes of the target tokens; None when the tokenizer's bytes are unknown."""
    num_rows: int
    """Packed rows read (document-level: rows the documents' fragments lie in)."""
    num_tokens: int
    """Tokens run through the model (document-level: over all windows, context repeated)."""

    @property
    def loss(self) -> float:
        """Mean cross-entropy per target token (nats): the training loss's normalisation."""
        return self.nll_sum / max(self.num_targets, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def bits_per_byte(self) -> float | None:
        if not self.num_bytes:
            return None
        return self.nll_sum / math.log(2) / self.num_bytes

    def to_json(self) -> dict:
        return {
            "loss": self.loss,
            "ppl": self.ppl,
            "bits_per_byte": self.bits_per_byte,
            "nll_sum": self.nll_sum,
            "target_tokens": self.num_targets,
            "bytes": self.num_bytes,
            "rows": self.num_rows,
            "tokens": self.num_tokens,
        }


# -- which rows ------------------------------------------------------------------------------------


class FirstRows:
    """The first ``num_rows`` rows of a split, in stored order (what `sequential_batches` reads)."""

    def __init__(self, split: Split, num_rows: int) -> None:
        self.split, self.num_rows, self.name = split, num_rows, split.name

    def row(self, index: int) -> PackedRow:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for the first {self.num_rows} rows of {self.name}")
        return self.split.row(index)


def rows_within(split: Split, *, max_rows: int | None = None, max_tokens: int | None = None) -> int:
    """How many leading rows of ``split`` the caps allow: at most ``max_rows``, and rows up to and
    including the one whose tokens reach ``max_tokens``."""
    num_rows = split.num_rows if max_rows is None else min(max_rows, split.num_rows)
    if max_tokens is not None and num_rows:
        reached = np.cumsum(split.row_lengths()[:num_rows]) >= max_tokens
        if reached.any():
            num_rows = int(np.argmax(reached)) + 1
    return num_rows


def check_caps(max_rows: int | None, max_tokens: int | None) -> None:
    for flag, value in (("--max-rows", max_rows), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} {value} must be at least 1 (leave it out to evaluate every row).")


# -- packed ----------------------------------------------------------------------------------------


def target_bytes(batch: VarlenBatch, byte_lengths: np.ndarray | None) -> int:
    """UTF-8 bytes of ``batch``'s target tokens (CPU batch)."""
    if byte_lengths is None:
        return 0
    labels = batch.labels.reshape(-1).numpy()
    return int(byte_lengths[labels[labels != IGNORE_INDEX]].sum())


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    split: Split | FirstRows,
    *,
    batch_size: int,
    device: torch.device,
    loss_fn: Callable[[VarlenBatch], torch.Tensor] | None = None,
    lockstep: bool = False,
    byte_lengths: np.ndarray | None = None,
) -> EvalFigures:
    """Summed NLL over every target token of ``split`` (rows shared among the ranks), in eval mode.

    ``loss_fn`` computes a micro-batch's loss sum (the FSDP root under --fsdp); default: ``model``'s.
    ``lockstep``: every rank runs as many forwards as the busiest one (FSDP gathers parameters with
    collectives, so a rank with one batch fewer would leave the others waiting forever); the extra
    forwards are not counted. The model is put back in train mode if it was in it.
    """
    rank, world_size = dist_info()
    loss_fn = loss_fn or partial(micro_batch_loss_sum, model)
    was_training = model.training
    model.eval()
    # nll, targets, bytes, tokens; float64 counts (float32 on MPS, which has none) are exact far beyond
    # any eval set
    totals = torch.zeros(4, dtype=sum_dtype(device), device=device)
    num_batches = math.ceil(len(range(rank, split.num_rows, world_size)) / batch_size)
    num_extra = 0
    if lockstep and world_size > 1:
        # Agreed before the first forward: collectives must pair up in the same order on every rank.
        import torch.distributed as dist

        most = torch.tensor([num_batches], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        num_extra = int(most) - num_batches
    counts = np.zeros(3, dtype=np.float64)
    for batch in sequential_batches(split, batch_size=batch_size, rank=rank, world_size=world_size):
        totals[0] += loss_fn(batch.to(device)).to(totals.dtype)
        counts += (batch.num_target_tokens, target_bytes(batch, byte_lengths), batch.num_tokens)
    for _ in range(num_extra):
        loss_fn(batch_from_rows([split.row(0)]).to(device))
    model.train(was_training)
    totals[1:] += torch.from_numpy(counts).to(device)
    nll, targets, num_bytes, tokens = all_reduce_sum(totals).tolist()
    return EvalFigures(
        nll_sum=nll,
        num_targets=int(targets),
        num_bytes=int(num_bytes) if byte_lengths is not None else None,
        num_rows=split.num_rows,
        num_tokens=int(tokens),
    )


def evaluate(
    model: torch.nn.Module,
    split: Split | FirstRows,
    *,
    batch_size: int,
    device: torch.device,
    loss_fn: Callable[[VarlenBatch], torch.Tensor] | None = None,
    lockstep: bool = False,
) -> float:
    """Mean cross-entropy over every target token of the split (all ranks), the training normalisation."""
    figures = evaluate_split(
        model, split, batch_size=batch_size, device=device, loss_fn=loss_fn, lockstep=lockstep
    )
    return figures.loss


# -- document-level --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Document:
    """One document rebuilt from its packed fragments."""

    doc_id: int
    input_ids: np.ndarray
    """int64, the document's whole token stream (BOS/EOS included)."""
    labels: np.ndarray
    """int64, the token where it is a target, -100 at the first token (and wherever the packed labels
    masked a token inside a fragment)."""
    num_fragments: int


def read_documents(
    split: Split, *, max_rows: int | None = None, max_tokens: int | None = None
) -> tuple[list[Document], int]:
    """Every document of ``split`` rebuilt from its fragments, and the number of rows they lie in.

    `prep pack` gives a document's fragments consecutive slices of its token stream in storage order
    (rows in order, shards in manifest order), though not in adjacent rows, and only the last fragment
    ends with the EOS; so a document is its segments (by ``doc_ids``) concatenated in storage order.
    With caps, the documents are those whose FIRST fragment lies in the leading rows the caps allow
    (:func:`rows_within`), each rebuilt whole from wherever its other fragments are.
    """
    lead = rows_within(split, max_rows=max_rows, max_tokens=max_tokens)
    eos_id = split.shards[0].metadata.get("eos_id") if split.shards else None
    pieces: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    rows_of: dict[int, set[int]] = {}
    unfinished: set[int] = set()  # documents whose EOS (ending their last fragment) is still to come
    for index in range(split.num_rows):
        if index >= lead and not unfinished and eos_id is not None:
            break  # every document of the leading rows is whole
        row = split.row(index)
        for k, doc in enumerate(row.doc_ids.tolist()):
            if doc not in pieces and index >= lead:
                continue  # a document starting after the leading rows
            a, b = int(row.cu_seqlens[k]), int(row.cu_seqlens[k + 1])
            pieces.setdefault(doc, []).append((row.input_ids[a:b], row.labels[a:b]))
            rows_of.setdefault(doc, set()).add(index)
            if row.input_ids[b - 1] == eos_id:
                unfinished.discard(doc)
            else:
                unfinished.add(doc)
    documents = []
    for doc, parts in pieces.items():
        input_ids = np.concatenate([p[0] for p in parts]).astype(np.int64)
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        # A fragment's first label is -100 only because the fragment starts there; in the whole
        # document that token has its predecessor as context.
        starts = np.cumsum([0, *(len(p[0]) for p in parts[:-1])])
        labels[starts[1:]] = input_ids[starts[1:]]
        labels[0] = IGNORE_INDEX
        documents.append(Document(doc, input_ids, labels, len(parts)))
    num_rows = len(set().union(*rows_of.values())) if rows_of else 0
    return documents, num_rows


def rolling_windows(num_tokens: int, *, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of each window over a document of ``num_tokens`` tokens: tokens
    ``begin:end`` are run, those from ``first_scored`` on (and never the document's first) are scored."""
    if not 1 <= stride < window:
        raise EvalError(
            f"--stride {stride} must be at least 1 and below --window {window}: a window's first token has"
            " no context in that window, so windows must overlap by at least one token."
        )
    found, begin, scored_to = [], 0, 1
    while True:
        end = min(begin + window, num_tokens)
        found.append((begin, end, scored_to))
        scored_to = end
        if end >= num_tokens:
            return found
        begin += stride


def window_batches(
    documents: list[Document], *, window: int, stride: int, batch_tokens: int
) -> Iterator[VarlenBatch]:
    """Every window of every document as a segment of a varlen batch of at most ``batch_tokens``
    tokens (or one window, if longer); a window's unscored tokens have label -100."""
    segments: list[tuple[np.ndarray, np.ndarray]] = []
    size = 0
    for doc in documents:
        for begin, end, first_scored in rolling_windows(len(doc.input_ids), window=window, stride=stride):
            labels = doc.labels[begin:end].copy()
            labels[: max(first_scored - begin, 1)] = IGNORE_INDEX
            if segments and size + (end - begin) > batch_tokens:
                yield segment_batch(segments)
                segments, size = [], 0
            segments.append((doc.input_ids[begin:end], labels))
            size += end - begin
    if segments:
        yield segment_batch(segments)


def segment_batch(segments: list[tuple[np.ndarray, np.ndarray]]) -> VarlenBatch:
    """One varlen batch of ``(input_ids, labels)`` segments, each with positions from 0."""
    lengths = [len(ids) for ids, _ in segments]
    labels = torch.from_numpy(np.concatenate([lab for _, lab in segments])).unsqueeze(0)
    return VarlenBatch(
        input_ids=torch.from_numpy(np.concatenate([ids for ids, _ in segments])).unsqueeze(0),
        labels=labels,
        position_ids=torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        cu_seqlens=torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32),
        max_seqlen=max(lengths),
        num_target_tokens=int((labels != IGNORE_INDEX).sum()),
    )


@torch.no_grad()
def evaluate_documents(
    model: torch.nn.Module,
    documents: list[Document],
    *,
    window: int,
    stride: int,
    batch_tokens: int,
    device: torch.device,
    num_rows: int = 0,
    byte_lengths: np.ndarray | None = None,
) -> EvalFigures:
    """Summed NLL of every document's tokens (all but its first), each scored once in rolling windows
    (the module docstring's); one process, eval mode."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=sum_dtype(device), device=device)
    num_targets = num_bytes = num_tokens = 0
    for batch in window_batches(documents, window=window, stride=stride, batch_tokens=batch_tokens):
        nll += micro_batch_loss_sum(model, batch.to(device)).to(nll.dtype)
        num_targets += batch.num_target_tokens
        num_bytes += target_bytes(batch, byte_lengths)
        num_tokens += batch.num_tokens
    model.train(was_training)
    return EvalFigures(
        nll_sum=float(nll),
        num_targets=num_targets,
        num_bytes=num_bytes if byte_lengths is not None else None,
        num_rows=num_rows,
        num_tokens=num_tokens,
    )


# -- bytes per token -------------------------------------------------------------------------------


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's ``bytes_to_unicode``, inverted): character -> the byte it stands for."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _is_byte_level(decoder: object) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return decoder.get("type") == "Sequence" and any(_is_byte_level(d) for d in decoder.get("decoders", []))


def token_byte_lengths(tokenizer_file: Path, vocab_size: int) -> np.ndarray | None:
    """UTF-8 bytes each token id decodes to (int64, ``vocab_size`` entries), or None when the tokenizer
    is not byte-level (its tokens' bytes then depend on their neighbours).

    As the ByteLevel decoder does: a token whose characters are all in the byte-level alphabet is one
    byte per character; another (an added token such as ``<tool_call>`` written out) is its UTF-8.
    Special tokens count 0: they are markers, not text.
    """
    raw = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    if not _is_byte_level(raw.get("decoder")) or not isinstance(raw.get("model", {}).get("vocab"), dict):
        return None
    alphabet = byte_level_alphabet()
    lengths = np.zeros(vocab_size, dtype=np.int64)

    def put(token: str, token_id: int) -> None:
        if 0 <= token_id < vocab_size:
            in_alphabet = all(c in alphabet for c in token)
            lengths[token_id] = len(token) if in_alphabet else len(token.encode("utf-8"))

    for token, token_id in raw["model"]["vocab"].items():
        put(token, token_id)
    for added in raw.get("added_tokens", []):
        put(added["content"], added["id"])
        if added.get("special") and 0 <= added["id"] < vocab_size:
            lengths[added["id"]] = 0
    return lengths


def find_tokenizer(manifest: Manifest, candidates: list[Path]) -> Path | None:
    """The first of ``candidates`` (a tokenizer.json, or a folder holding one), then the manifest's
    own path, whose sha256 is the one the dataset was packed with."""
    for candidate in [*candidates, Path(manifest.tokenizer.path)]:
        file = candidate / "tokenizer.json" if candidate.is_dir() else candidate
        if file.is_file() and sha256_file(file) == manifest.tokenizer.sha256:
            return file
    return None
