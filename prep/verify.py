"""`prep verify` as a library call: prove that a packed dataset folder holds what its manifest promises.

Checks run class by class and stop at the first failure with a :class:`~shared.checks.RowCheckError` that
names the shard, row, segment and token (see :data:`shared.checks.CHECKS`):

- tokenizer: the fingerprint of ``--tokenizer`` (default: the manifest's path, if it still exists);
- files: every shard's sha256, schema, format version and metadata match the manifest, so do the counts,
  and no unlisted shard lies beside them;
- structure, tokens, eos, positions, labels, special: every row of every record batch (vectorised numpy,
  :func:`shared.checks.check_batch`); `special` needs the tokenizer to know its special ids;
- documents: each document's last segment, and only it, ends with the EOS; no document has two segments
  in one row; the manifest's accounting adds up. Fragments store no offsets, so a lost middle fragment
  shows up in the token accounting (and under ``--source``);
- sources: with ``--source``, a sample of records re-read and re-tokenized must equal, token for token,
  what the shards store, in the split their content hash chooses;
- inputs: with ``--inputs``, every input at the path the manifest records is hashed again (read once, not
  parsed or tokenized) and must have the size and sha256 recorded when it was packed (prep/provenance.py);
  a different modification time alone is a note, not a failure (a copy or checkout sets it).

A check that cannot run is listed in the report as skipped, with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prep.chat_verify import compare_chat_sources, template_special_ids
from prep.provenance import fingerprint_files, is_stdin
from prep.readers import InputFile
from prep.tokenizer import LoadedTokenizer, load_tokenizer
from prep.urls import is_url
from shared.checks import CHECKS, RowCheckError, SplitSegments, TokenRules, check_batch, check_documents
from shared.contract import DOC_IDS, FORMAT_NAME, FORMAT_VERSION, SHARD_SUFFIX
from shared.errors import ManifestError, UserError
from shared.manifest import Manifest
from shared.reader import Shard, check_shard_file, shard_path, vocab_size_edited

DEFAULT_SAMPLE = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyConfig:
    root: Path
    tokenizer: str | None = None
    """Check the fingerprint of this tokenizer; default: the manifest's path, if it still exists."""
    sources: tuple[str, ...] = ()
    """The inputs given to `prep pack`, in the same order: re-tokenize a sample and compare."""
    sample: int = DEFAULT_SAMPLE
    """Source records to re-tokenize (chosen with a fixed seed, plus up to 16 split documents)."""
    inputs: bool = False
    """Hash every input again (at the manifest's paths) and compare with the fingerprints it records."""

    def __post_init__(self) -> None:
        if any(is_stdin(s) for s in self.sources):
            raise UserError(
                "--source - : standard input cannot be compared (it would be read again, here). Save what"
                " you packed from it to a file, pack and verify that."
            )
        if self.sample < 1:
            raise UserError(f"--sample {self.sample} must be at least 1.")


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitReport:
    name: str
    num_shards: int
    num_rows: int
    num_tokens: int
    num_target_tokens: int
    num_segments: int
    num_docs: int
    num_fragmented_docs: int
    """Documents stored as more than one segment."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyReport:
    root: Path
    splits: tuple[SplitReport, ...]
    checks: tuple[str, ...]
    """Check classes that ran and held."""
    skipped: tuple[str, ...]
    """Checks that did not run, each with the reason."""
    tokenizer: str | None
    num_source_records: int
    """Source records compared with the shards (0 without ``--source``)."""
    num_bytes: int
    seconds: float
    """Wall time of the whole verification (tokenizer load, checksums, rows, sources)."""
    row_seconds: float
    """Wall time of the per-row checks alone."""
    input_notes: tuple[str, ...] = ()
    """What the inputs check found worth saying that is not a failure (an input it could not check, say)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.splits)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


def _fail(check: str, message: str, fix: str = "Re-run `prep pack`.") -> RowCheckError:
    return RowCheckError(check, message, fix)


def _resolve_tokenizer(cfg: VerifyConfig, m: Manifest) -> tuple[LoadedTokenizer | None, str | None]:
    """The tokenizer to check with, and why there is none when there is none."""
    t = m.tokenizer
    path = cfg.tokenizer or t.path
    if cfg.tokenizer is None and not Path(t.path).exists():
        return None, f"no tokenizer: `{t.path}` from the manifest is gone (pass --tokenizer)"
    tok = load_tokenizer(path, eos_token=t.eos_token, bos_token=t.bos_token)
    if tok.info.sha256 != t.sha256:
        if cfg.tokenizer is None:
            return (
                None,
                f"no tokenizer: `{t.path}` changed since packing (pass the original with --tokenizer)",
            )
        raise _fail(
            "tokenizer",
            f"tokenizer `{path}` has fingerprint {tok.info.sha256[:12]}..., the data was packed with"
            f" {t.sha256[:12]}... (`{t.path}`).",
            "Pass the tokenizer the data was packed with, or re-pack with this one.",
        )
    if tok.info.vocab_size != t.vocab_size:
        raise ManifestError(vocab_size_edited(cfg.root, m, tok.info.vocab_size))
    return tok, None


def _open_shards(root: Path, m: Manifest) -> dict[str, list[Shard]]:
    """Files check: checksum, schema, version, metadata and counts of every shard against the manifest."""
    t = m.tokenizer
    expected_meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "seq_len": m.seq_len,
        "strategy": m.options.strategy,
        "eos_id": t.eos_id,
        "bos_id": t.bos_id,
        "tokenizer_sha256": t.sha256,
    }
    listed = {sh.file for s in m.splits.values() for sh in s.shards}
    # The card's `data_files` globs `train-*.arrow`: a stray shard would be loaded by `datasets` as data.
    if stray := sorted(p.name for p in root.glob(f"*{SHARD_SUFFIX}") if p.name not in listed):
        raise _fail(
            "files",
            f"`{stray[0]}` is not listed in the manifest ({len(stray)} such file(s)); readers that glob"
            " shards would load it as data.",
            "Delete it, or re-pack into an empty folder.",
        )
    opened = {}
    for name, split in m.splits.items():
        shards = []
        for info in split.shards:
            path = shard_path(root, info.file)
            check_shard_file(path, info, checksum=True)
            shard = Shard(path, info)
            if shard.metadata.get("vocab_size", t.vocab_size) != t.vocab_size:
                raise ManifestError(vocab_size_edited(root, m, shard.metadata["vocab_size"]))
            for key, want in {**expected_meta, "split": name}.items():
                if shard.metadata.get(key) != want:
                    raise _fail(
                        "files",
                        f"shard `{info.file}`: metadata `{key}` is {shard.metadata.get(key)!r}, the manifest"
                        f" says {want!r}; the shard belongs to another dataset.",
                    )
            num_segments = sum(len(b.column(DOC_IDS).values) for b in shard.batches())
            found = {
                "num_rows": shard.num_rows,
                "num_tokens": int(shard.row_lengths().sum()),
                "num_segments": num_segments,
            }
            _compare_counts(f"shard `{info.file}`", info, found)
            shards.append(shard)
        totals = {
            k: sum(getattr(s, k) for s in split.shards)
            for k in ("num_rows", "num_tokens", "num_segments", "num_docs")
        }
        _compare_counts(f"split `{name}` (sum of its shards)", split, totals)
        opened[name] = shards
    return opened


def _compare_counts(what: str, info: object, found: dict[str, int]) -> None:
    for key, value in found.items():
        if getattr(info, key) != value:
            raise _fail(
                "files", f"{what}: the manifest says {key} = {getattr(info, key):,}, found {value:,}."
            )


def _check_rows(m: Manifest, shards: dict[str, list[Shard]], rules: TokenRules) -> dict[str, SplitSegments]:
    """Every batch of every shard through :func:`check_batch`, then each split's documents."""
    result = {}
    for name, split_shards in shards.items():
        parts, target = [], 0
        for i, shard in enumerate(split_shards):
            base = 0
            num_docs = 0
            for batch in shard.batches():
                segs = check_batch(batch, rules, shard=shard.path.name, row_base=base)
                base += batch.num_rows
                num_docs += int(segs.ends_with_eos.sum())
                target += segs.num_target_tokens
                parts.append((i, segs))
            _compare_counts(f"shard `{shard.path.name}`", shard.info, {"num_docs": num_docs})
        _compare_counts(f"split `{name}`", m.splits[name], {"num_target_tokens": target})
        segs = SplitSegments.concat([s.path.name for s in split_shards], parts)
        check_documents(segs, has_bos=rules.bos_id is not None)
        result[name] = segs
    return result


def _check_accounting(m: Manifest, segs: dict[str, SplitSegments]) -> dict[str, int]:
    """Documents check: the manifest's accounting against the documents actually stored."""
    d = m.documents
    if problems := d.problems():
        raise _fail(
            "documents", f"the manifest's document accounting does not add up: {'; '.join(problems)}."
        )
    fragmented, all_docs = {}, []
    for name, s in segs.items():
        docs, counts = np.unique(s.doc_id, return_counts=True)
        if len(docs) != m.splits[name].num_docs:
            raise _fail(
                "documents",
                f"split `{name}` stores {len(docs):,} distinct doc_ids, the manifest says {m.splits[name].num_docs:,}.",
            )
        fragmented[name] = int((counts > 1).sum())
        all_docs.append(docs)
    docs = np.concatenate(all_docs)
    if len(np.unique(docs)) != len(docs):
        shared_ids = np.intersect1d(*all_docs[:2]) if len(all_docs) > 1 else docs
        raise _fail("documents", f"doc_id {shared_ids[0]} is stored in more than one split.")
    stored_tokens = sum(int(s.length.sum()) for s in segs.values())
    checks = (
        _mixture_checks(m, docs, stored_tokens)
        if m.mixture
        else _plain_checks(m, docs, stored_tokens, fragmented)
    )
    for ok, why in checks:
        if not ok:
            raise _fail("documents", why + ".")
    return fragmented


def _plain_checks(
    m: Manifest, docs: np.ndarray, stored_tokens: int, fragmented: dict[str, int]
) -> list[tuple[bool, str]]:
    d = m.documents
    return [
        (len(docs) == d.packed, f"{len(docs):,} documents are stored, the manifest says {d.packed:,} packed"),
        (
            stored_tokens == d.tokens_packed,
            f"{stored_tokens:,} tokens are stored, the manifest says {d.tokens_packed:,} packed"
            " (a fragment is missing, or extra tokens were added)",
        ),
        (
            len(docs) == 0 or (docs.min() >= 0 and docs.max() < d.docs_in),
            f"doc_ids run {docs.min() if len(docs) else 0}..{docs.max() if len(docs) else 0}, outside the"
            f" {d.docs_in:,} input records",
        ),
        (
            sum(fragmented.values()) >= d.split,
            f"{sum(fragmented.values()):,} documents are stored in fragments, fewer than the {d.split:,} the"
            " manifest says were split",
        ),
    ]


def _mixture_checks(m: Manifest, docs: np.ndarray, stored_tokens: int) -> list[tuple[bool, str]]:
    """A mixture's accounting: per source, and its sums against the documents and tokens stored.

    Copies of a repeated document are stored under ``doc_id + copy * docs_in`` (prep/mixture.py).
    """
    assert m.mixture is not None
    d, sources = m.documents, m.mixture.sources
    problems = [p for s in sources for p in s.problems()]
    packed = sum(s.docs_packed for s in sources)
    repeated = sum(s.docs_repeated for s in sources)
    tokens = sum(s.tokens_packed + s.tokens_repeated for s in sources)
    return [
        (not problems, f"the mixture's accounting does not add up: {'; '.join(problems)}"),
        (
            sum(s.docs_in for s in sources) == d.packed
            and sum(s.tokens_in for s in sources) == d.tokens_packed,
            f"the sources' documents and tokens in ({sum(s.docs_in for s in sources):,},"
            f" {sum(s.tokens_in for s in sources):,}) are not the {d.packed:,} documents and"
            f" {d.tokens_packed:,} tokens read",
        ),
        (
            len(docs) == packed + repeated,
            f"{len(docs):,} documents are stored, the mixture says {packed:,} packed + {repeated:,} repeated",
        ),
        (
            stored_tokens == tokens,
            f"{stored_tokens:,} tokens are stored, the mixture says {tokens:,} packed and repeated",
        ),
        (
            len(docs) == 0 or (docs.min() >= 0 and int((docs >= d.docs_in).sum()) == repeated),
            f"{int((docs >= d.docs_in).sum()):,} doc_ids are repeats (>= {d.docs_in:,}), the mixture says"
            f" {repeated:,}",
        ),
    ]


def _check_input_counts(m: Manifest, segs: dict[str, SplitSegments]) -> None:
    """Each input file's documents and tokens, as the manifest records them, against the stored segments.

    A mixture samples after these counts were taken, so there only their sums are checked.
    """
    if any(i.num_docs is None or i.num_tokens is None for i in m.inputs):
        return  # written before inputs recorded them
    d = m.documents
    docs, tokens = sum(i.num_docs or 0 for i in m.inputs), sum(i.num_tokens or 0 for i in m.inputs)
    if (docs, tokens) != (d.packed, d.tokens_packed):
        raise _fail(
            "documents",
            f"the inputs' documents and tokens add up to {docs:,} and {tokens:,}, the manifest's"
            f" accounting says {d.packed:,} and {d.tokens_packed:,} packed.",
        )
    if m.mixture is not None or not m.inputs:
        return
    first = np.array([i.first_doc_id for i in m.inputs], np.int64)
    doc_id = np.concatenate([s.doc_id for s in segs.values()])
    length = np.concatenate([s.length for s in segs.values()])
    owner = np.searchsorted(first, doc_id, side="right") - 1
    num_tokens = np.bincount(owner, weights=length, minlength=len(first))
    num_docs = np.bincount(owner[np.unique(doc_id, return_index=True)[1]], minlength=len(first))
    for k, info in enumerate(m.inputs):
        if (int(num_docs[k]), int(num_tokens[k])) != (info.num_docs, info.num_tokens):
            raise _fail(
                "documents",
                f"input `{info.path}`: the shards hold {int(num_docs[k]):,} of its documents and"
                f" {int(num_tokens[k]):,} tokens, the manifest says {info.num_docs:,} and {info.num_tokens:,}.",
            )


def _check_source_tokens(m: Manifest, segs: dict[str, SplitSegments]) -> None:
    """Each source's tokens per split, counted in the shards, against the mixture's record and shares."""
    if m.mixture is None:
        return
    first = np.array([i.first_doc_id for i in m.inputs], np.int64)
    names = [s.name for s in m.mixture.sources]
    file_source = np.array([names.index(i.source) if i.source in names else -1 for i in m.inputs], np.int64)
    docs_in = max(m.documents.docs_in, 1)
    for split, s in segs.items():
        owner = file_source[np.searchsorted(first, s.doc_id % docs_in, side="right") - 1]
        found = np.bincount(owner[owner >= 0], weights=s.length[owner >= 0], minlength=len(names))
        total = m.splits[split].num_tokens
        for k, src in enumerate(m.mixture.sources):
            said = getattr(src, f"{split}_tokens")
            if int(found[k]) != said:
                raise _fail(
                    "documents",
                    f"source `{src.name}`: the `{split}` shards hold {int(found[k]):,} of its tokens, the"
                    f" manifest says {said:,}.",
                )
            if split == "train" and abs(src.achieved_share - said / max(total, 1)) > 1e-9:
                raise _fail(
                    "documents",
                    f"source `{src.name}`: the manifest's achieved share {src.achieved_share:.6g} is not its"
                    f" {said:,} of {total:,} train tokens ({said / max(total, 1):.6g}).",
                )


def _token_rules(m: Manifest, tok: LoadedTokenizer | None) -> TokenRules:
    specials = ()
    if tok is not None:
        placed = {m.tokenizer.eos_id, m.tokenizer.bos_id} | template_special_ids(m, tok)
        specials = tuple(int(i) for i in tok.special_ids() if int(i) not in placed)
    return TokenRules(
        seq_len=m.seq_len,
        eos_id=m.tokenizer.eos_id,
        bos_id=m.tokenizer.bos_id,
        vocab_size=m.tokenizer.vocab_size,
        special_ids=specials,
        masked_labels=m.options.masked_labels,
    )


def _split_reports(m: Manifest, fragmented: dict[str, int]) -> tuple[SplitReport, ...]:
    return tuple(
        SplitReport(
            name=name,
            num_shards=len(s.shards),
            num_rows=s.num_rows,
            num_tokens=s.num_tokens,
            num_target_tokens=s.num_target_tokens,
            num_segments=s.num_segments,
            num_docs=s.num_docs,
            num_fragmented_docs=fragmented[name],
        )
        for name, s in m.splits.items()
    )


def check_inputs(m: Manifest) -> list[str]:
    """Inputs check: each input's size and sha256 now against the manifest's; the notes that are no failure.

    Raises a ``RowCheckError`` naming every input that changed or is gone.
    """
    notes, changed = [], []
    for info in m.inputs:
        if is_stdin(info.path):
            notes.append("`-` was standard input, which cannot be read again")
            continue
        if info.sha256 is None:
            notes.append(f"`{info.path}` has no fingerprint (packed before manifests recorded them)")
            continue
        url = info.path if is_url(info.path) else None
        source = InputFile(Path(info.path), info.format, info.dataset_split, url=url)
        try:
            now = fingerprint_files(source.files(), info.path)
        except FileNotFoundError:
            changed.append(f"`{info.path}` is gone")
            continue
        if (now.num_bytes, now.sha256) != (info.num_bytes, info.sha256):
            changed.append(
                f"`{info.path}` is {now.num_bytes:,} bytes with sha256 {now.sha256[:12]}..., it was"
                f" {info.num_bytes or 0:,} bytes with sha256 {info.sha256[:12]}..."
            )
        elif now.mtime_ns != info.mtime_ns:
            notes.append(
                f"`{info.path}` has the same bytes, a different modification time (copied or touched)"
            )
    if changed:
        raise _fail(
            "inputs",
            f"inputs changed since packing: {'; '.join(changed)}.",
            "Pack the current inputs again (`prep pack ... --overwrite`), or restore the ones this dataset"
            " was packed from. Paths are as given to `prep pack`: run this from the folder it ran in.",
        )
    return notes


def verify_dataset(cfg: VerifyConfig) -> VerifyReport:
    """Run every check on ``cfg.root``; raise a :class:`UserError` at the first failure, else report."""
    start = time.perf_counter()
    m = Manifest.load(cfg.root)
    tok, no_tok_reason = _resolve_tokenizer(cfg, m)
    if cfg.sources and tok is None:
        raise UserError(f"--source needs the tokenizer the data was packed with ({no_tok_reason}).")
    shards = _open_shards(cfg.root, m)
    row_start = time.perf_counter()
    segs = _check_rows(m, shards, _token_rules(m, tok))
    row_seconds = time.perf_counter() - row_start
    fragmented = _check_accounting(m, segs)
    _check_input_counts(m, segs)
    _check_source_tokens(m, segs)
    skipped = {}
    if tok is None:
        skipped["tokenizer"] = f"tokenizer fingerprint ({no_tok_reason})"
        skipped["special"] = f"special tokens ({no_tok_reason})"
    num_source = 0
    if cfg.sources:
        from prep.sources import compare_sources

        assert tok is not None
        if m.options.masked_labels:
            num_source = compare_chat_sources(m, tok, cfg.sources, shards, segs, cfg.sample)
        else:
            num_source = compare_sources(m, tok, cfg.sources, shards, segs, cfg.sample)
    else:
        skipped["sources"] = "sources (pass --source with the inputs given to `prep pack`)"
    input_notes = check_inputs(m) if cfg.inputs else []
    if not cfg.inputs:
        skipped["inputs"] = "inputs' fingerprints (pass --inputs to hash the inputs again and compare)"
    checks = tuple(c for c in CHECKS if c not in skipped)
    return VerifyReport(
        root=cfg.root,
        splits=_split_reports(m, fragmented),
        checks=checks,
        skipped=tuple(skipped.values()),
        tokenizer=None if tok is None else tok.info.path,
        num_source_records=num_source,
        num_bytes=sum(sh.num_bytes for s in m.splits.values() for sh in s.shards),
        seconds=time.perf_counter() - start,
        row_seconds=row_seconds,
        input_notes=tuple(input_notes),
    )
