"""Mixtures (`prep pack --recipe` / `--source`): shares met by whole documents, the cap, the accounting.

The sources are three synthetic corpora of the bundled sample's kind (without its giant documents),
of different sizes, so that one
source is upsampled, one kept about whole and one downsampled. Every share is measured in the shards
themselves (each segment's doc id leads to its input file, and the file to its source), not only read
back from the manifest.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from prep.journal import KILL_ENV
from prep.mixture import SourceDocs, sample_keys, take, val_quotas
from prep.recipe import RecipeError, mixture_from_dict, parse_source_option
from prep.sample import sample_documents
from shared.manifest import Manifest
from shared.reader import PackedDataset, PackedRow
from tests.prep.clirun import failed_with, ok, run

SHARES = {"news": 0.5, "calls": 0.3, "notes": 0.2}
SIZES = {"news": 300, "calls": 150, "notes": 60}
MAX_CHARS = 3000
LAUNCH = "import prep.encoder as e; e.BATCH_CHARS = 20_000; from prep.cli import main; main()"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpora(sample, tmp_path_factory) -> dict[str, Path]:
    """Three JSONL sources of different sizes (and one with its text under another field)."""
    folder = tmp_path_factory.mktemp("mix-inputs")
    paths = {}
    for k, (name, size) in enumerate(SIZES.items()):
        field = "body" if name == "notes" else "text"
        path = folder / f"{name}.jsonl"
        # Documents of up to ~1k tokens, as in most corpora: a share is met to about one document.
        docs = [d for d in sample_documents(size, seed=10 + k) if 0 < len(d) < MAX_CHARS]
        path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs), encoding="utf-8")
        paths[name] = path
    return paths


def source_args(corpora: dict[str, Path], shares: dict[str, float] = SHARES) -> list[str]:
    args = []
    for name, share in shares.items():
        field = ":text_field=body" if name == "notes" else ""
        args += ["--source", f"{name}={corpora[name]}:share={share}{field}"]
    return args


def pack(sample, out: Path, *args: str):
    _, tokenizer = sample
    common = ["--tokenizer", tokenizer, "--out", out, "--seq-len", "256", "--val-fraction", "0.05"]
    return run("pack", *args, *common)


def rows(out: Path, split: str) -> list[PackedRow]:
    data = PackedDataset(out).split(split)
    return [data.row(i) for i in range(data.num_rows)]


def shard_tokens_by_source(out: Path, split: str = "train") -> dict[str, int]:
    """Tokens of each source in a split's shards, found from the stored doc ids alone."""
    m = Manifest.load(out)
    first = np.array([i.first_doc_id for i in m.inputs])
    found: dict[str, int] = {}
    for row in rows(out, split):
        lengths = np.diff(row.cu_seqlens)
        files = np.searchsorted(first, row.doc_ids % m.documents.docs_in, side="right") - 1
        for f, n in zip(files, lengths, strict=True):
            source = m.inputs[f].source
            found[source] = found.get(source, 0) + int(n)
    return found


def assert_same_dataset(a: Path, b: Path) -> None:
    """Every file byte for byte; the card names its own folder, so that one with the name swapped."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        got = (b / name).read_bytes()
        if name == "README.md":
            got = got.replace(str(b).encode(), str(a).encode())
            got = got.replace(f"`{b.name}`".encode(), f"`{a.name}`".encode())
        assert (a / name).read_bytes() == got, name


@pytest.fixture(scope="module")
def mixed(sample, corpora, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "out"
    ok(pack(sample, out, *source_args(corpora), "--max-epochs", "3"))
    return out


def test_three_sources_land_within_half_a_percent_of_their_shares(mixed):
    found = shard_tokens_by_source(mixed)
    total = sum(found.values())
    m = Manifest.load(mixed)
    assert total == m.splits["train"].num_tokens
    for name, share in SHARES.items():
        assert abs(found[name] / total - share) <= 0.005 * share, (name, found[name] / total)
    by_name = {s.name: s for s in m.mixture.sources}
    assert {n: by_name[n].train_tokens for n in SHARES} == found
    # The sizes make one source repeated and another cut: the test exercises both ways.
    assert by_name["notes"].docs_repeated > 0 and by_name["news"].docs_left_out > 0


def test_accounting_identity_holds_per_source_and_verify_passes(mixed, sample, corpora):
    m = Manifest.load(mixed)
    assert m.mixture is not None and not m.documents.problems()
    for s in m.mixture.sources:
        assert not s.problems()
        assert s.docs_in == s.docs_packed + s.docs_left_out
        assert s.tokens_in == s.tokens_packed + s.tokens_left_out
        assert s.tokens_packed + s.tokens_repeated == s.train_tokens + s.val_tokens
    assert sum(s.docs_in for s in m.mixture.sources) == m.documents.packed
    stored = sum(split.num_tokens for split in m.splits.values())
    assert stored == sum(s.tokens_packed + s.tokens_repeated for s in m.mixture.sources)
    sources = [a for name in SHARES for a in ("--source", corpora[name])]
    output = ok(run("verify", mixed, "--tokenizer", sample[1], *sources))
    assert "documents, sources" in " ".join(output.split())


def test_card_shows_the_mixture_as_a_table_and_a_chart(mixed):
    card = (mixed / "README.md").read_text(encoding="utf-8")
    assert "## Mixture" in card and "| news | 50.00% |" in card and "news   asked ####" in card
    png = (mixed / "card_lengths.png").read_bytes()
    width = int.from_bytes(png[16:20], "big")  # IHDR: a fourth panel beside the plain card's three
    assert width == 2000


def test_val_never_shares_a_record_with_train_and_repeats_stay_in_train(mixed):
    m = Manifest.load(mixed)
    records = {}
    for split in ("train", "val"):
        ids = np.concatenate([row.doc_ids for row in rows(mixed, split)])
        records[split] = set((ids % m.documents.docs_in).tolist())
        if split == "val":
            assert (ids < m.documents.docs_in).all()  # no copy in val
    assert records["val"] and not records["train"] & records["val"]


@pytest.mark.slow
def test_rerun_and_toml_recipe_are_byte_identical(mixed, sample, corpora, tmp_path):
    recipe = tmp_path / "mix.toml"
    lines = ["max_epochs = 3", ""]
    for name, share in SHARES.items():
        lines += [f"[sources.{name}]", f'inputs = ["{corpora[name]}"]', f"share = {share}"]
        lines += ['text_field = "body"'] if name == "notes" else []
    recipe.write_text("\n".join(lines) + "\n", encoding="utf-8")
    again = tmp_path / "again"
    ok(pack(sample, again, "--recipe", recipe))
    assert_same_dataset(mixed, again)


@pytest.mark.slow
def test_the_sample_does_not_depend_on_input_order(sample, corpora, tmp_path):
    """A source's files given the other way round: the same documents are chosen (counted by content)."""
    halves = []
    lines = corpora["news"].read_text(encoding="utf-8").splitlines(keepends=True)
    for k in range(2):
        path = tmp_path / f"news{k}.jsonl"
        path.write_text("".join(lines[k::2]), encoding="utf-8")
        halves.append(str(path))
    got = []
    for order in (halves, halves[::-1]):
        out = tmp_path / f"out{len(got)}"
        args = [
            "--source",
            f"news={','.join(order)}:share=0.6",
            "--source",
            f"calls={corpora['calls']}:share=0.4",
        ]
        ok(pack(sample, out, *args))
        m = Manifest.load(out)
        got.append(
            [
                (s.name, s.docs_packed, s.docs_left_out, s.train_tokens, s.val_tokens)
                for s in m.mixture.sources
            ]
        )
    assert got[0] == got[1]


@pytest.mark.slow
def test_the_repetition_cap_is_honoured(sample, corpora, tmp_path):
    out = tmp_path / "capped"
    assert "note: source" not in ok(pack(sample, out, *source_args(corpora), "--max-epochs", "2.5"))
    m = Manifest.load(out)
    docs_in = m.documents.docs_in
    ids = np.concatenate([row.doc_ids for row in rows(out, "train")])
    copies = np.bincount((np.unique(ids) % docs_in).astype(np.int64))  # unique: a fragment is no copy
    assert copies.max() <= 3  # 2.5 epochs: two whole copies and a hashed half
    for s in m.mixture.sources:  # copy 0 of every train document is there once a source repeats
        first_copies = s.train_tokens - s.tokens_repeated
        assert s.docs_repeated == 0 or s.tokens_repeated <= 1.5 * first_copies
    # A total the cap cannot reach is refused, with what the cap allows.
    total = ["--max-epochs", "1.2", "--total-tokens", str(m.splits["train"].num_tokens)]
    result = pack(sample, tmp_path / "refused", *source_args(corpora), *total)
    # Beside --source, the keys are named as the flags that set them.
    failed_with(result, "would need", "above --max-epochs 1.2", "or lower --total-tokens to", flat=True)
    # The tokenized work is kept: the fixed recipe resumes from it and gives the same bytes as a fresh run.
    failed_with(result, "(or the --source options) and run the same command with `--resume`", flat=True)
    fixed = ["--max-epochs", "2.5", "--resume"]
    ok(pack(sample, tmp_path / "refused", *source_args(corpora), *fixed))
    assert_same_dataset(out, tmp_path / "refused")


@pytest.mark.slow
def test_epochs_source_takes_whole_epochs_and_a_hashed_fraction(sample, corpora, tmp_path):
    out = tmp_path / "epochs"
    args = [
        "--source",
        f"news={corpora['news']}:epochs=1.5",
        "--source",
        f"calls={corpora['calls']}:share=0.25",
    ]
    ok(pack(sample, out, *args, "--max-epochs", "2"))
    m = Manifest.load(out)
    news, calls = m.mixture.sources
    train_in = news.train_tokens - news.tokens_repeated  # every train document once, then half again
    assert abs(news.tokens_repeated / train_in - 0.5) <= 0.02
    assert news.tokens_repeated <= 0.5 * train_in
    assert abs(calls.achieved_share - 0.25) <= 0.005 * 0.25
    ok(run("verify", out))


@pytest.mark.slow
def test_resume_after_a_kill_in_a_mixture_gives_the_same_bytes(mixed, sample, corpora, tmp_path):
    for point in ("tokenize:3", "shard:1"):
        out = tmp_path / point.replace(":", "-")
        _, tokenizer = sample
        argv = ["pack", *source_args(corpora), "--max-epochs", "3", "--tokenizer", str(tokenizer)]
        argv += ["--out", str(out), "--seq-len", "256", "--val-fraction", "0.05", "--workers", "1"]
        env = {**os.environ, KILL_ENV: point, "PYTHONPATH": str(REPO)}
        killed = subprocess.run([sys.executable, "-c", LAUNCH, *argv], env=env, capture_output=True, cwd=REPO)
        assert killed.returncode == -9, killed.stderr.decode()
        env.pop(KILL_ENV)
        resumed = subprocess.run(
            [sys.executable, "-c", LAUNCH, *argv, "--resume"], env=env, capture_output=True
        )
        assert resumed.returncode == 0, resumed.stderr.decode()
        assert_same_dataset(mixed, out)


def test_verify_catches_a_tampered_per_source_count(mixed, tmp_path):
    import shutil

    raw = json.loads((mixed / "manifest.json").read_text(encoding="utf-8"))
    cases = {
        "left out": ("docs_left_out", 1, None, 0, "the mixture's accounting does not add up"),
        "moved between splits": ("train_tokens", 5, "val_tokens", -5, "the `train` shards hold"),
    }
    for why, (key, delta, other, other_delta, message) in cases.items():
        folder = tmp_path / why.replace(" ", "-")
        shutil.copytree(mixed, folder)
        edited = json.loads(json.dumps(raw))
        source = edited["mixture"]["sources"][0]
        source[key] += delta
        if other:
            source[other] += other_delta
        (folder / "manifest.json").write_text(json.dumps(edited, indent=2) + "\n", encoding="utf-8")
        failed_with(run("verify", folder), "documents check failed", message, flat=True)


def test_take_comes_closest_to_the_quota_by_whole_documents():
    docs = np.arange(6)
    lengths = np.array([10, 20, 30, 40, 50, 60])
    keys = np.arange(6, dtype=np.uint64)[::-1].copy()  # hash order: the last document first
    got = take(docs, lengths, keys, 2 * 210 + 100, None)  # two epochs and 100 tokens
    assert (np.bincount(got.copy) == [6, 6, 2]).all()
    # In hash order 60 fits, 50 would overshoot and is passed over for 40, which fills the 100 exactly.
    assert sorted(got.docs[got.copy == 2].tolist()) == [3, 5]
    capped = take(docs, lengths, keys, 2 * 210 + 100, None, max_epochs=2.2)  # the cap: 42 tokens more
    assert int(lengths[capped.docs].sum()) <= 2.2 * 210
    assert len(take(docs, lengths, keys, 5 * 210, 1).docs) == 6  # val: never a second copy


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"sources": {"a": {"inputs": ["x"], "share": 1.0, "weight": 2}}}, "unknown key `sources.a.weight`"),
        ({"sources": {"a": {"inputs": ["x"], "share": 1.0}}, "seeds": 1}, "unknown key `seeds`"),
        (
            {"sources": {"a": {"inputs": ["x"], "share": "0.5"}}},
            "`sources.a.share` is a string; expected a number",
        ),
        ({"sources": {"a": {"inputs": 3, "share": 1.0}}}, "`sources.a.inputs` is an integer"),
        ({"sources": {"a": {"inputs": ["x"], "share": 0.5, "epochs": 1}}}, "gives both `share` and `epochs`"),
        ({"sources": {"a": {"inputs": ["x"]}}}, "needs `share` (of the packed tokens) or `epochs`"),
        (
            {"sources": {"a": {"inputs": ["x"], "share": 0.6}, "b": {"inputs": ["y"], "share": 0.6}}},
            "a=0.5, b=0.5",
        ),
        (
            {"sources": {"a": {"inputs": ["x"], "share": 1.5}}},
            "`sources.a.share` is 1.5; a share is in (0, 1]",
        ),
        ({"sources": {"a": {"inputs": ["x"], "share": 70}}}, "a share is in (0, 1] (70% is 0.7)"),
        (
            {"sources": {"a": {"inputs": ["x"], "share": 1.0}}, "seed": -1},
            "`seed` is -1; a seed is a whole number",
        ),
        ({"sources": {"a": {"inputs": ["x"], "epochs": 3}}}, "raise `max_epochs` to 3"),
        (
            {
                "sources": {"a": {"inputs": ["x"], "epochs": 1}, "b": {"inputs": ["y"], "share": 0.5}},
                "total_tokens": 9,
            },
            "`total_tokens` with source `a` in epochs",
        ),
        ({"sources": {"a": {"inputs": ["x"], "share": 1.0}}, "max_epochs": 0.5}, "`max_epochs` is 0.5"),
        ({"sources": {}}, "no sources"),
        (
            {"sources": {"a": {"inputs": ["x"], "share": 1.0}}, "total_tokens": 1.5},
            "`total_tokens` is a number",
        ),
    ],
)
def test_bad_recipes_name_the_key_and_the_fix(raw, message):
    with pytest.raises(RecipeError) as e:
        mixture_from_dict(raw)
    assert message in str(e.value)


def test_source_option_syntax():
    s = parse_source_option("news=s3://bucket/a.jsonl,b/*.jsonl.gz:share=0.3:text_field=body")
    assert (s.name, s.inputs, s.share, s.text_field) == (
        "news",
        ("s3://bucket/a.jsonl", "b/*.jsonl.gz"),
        0.3,
        "body",
    )
    for spec, message in (
        ("news", "expected NAME=INPUTS"),
        ("news=a.jsonl:share=x", "`share=x` is not a number"),
        ("news=a.jsonl:weight=2", "unknown key `weight`"),
    ):
        with pytest.raises(RecipeError, match=message):
            parse_source_option(spec)


def test_cli_refuses_mixing_the_ways_to_give_inputs(sample, corpora, tmp_path):
    out = tmp_path / "out"
    failed_with(
        pack(sample, out, str(corpora["news"]), *source_args(corpora)), "given beside a mixture", flat=True
    )
    failed_with(
        pack(sample, out, str(corpora["news"]), "--max-epochs", "2"), "--max-epochs belongs to a mixture"
    )
    twice = ["--source", f"a={corpora['news']}:share=0.5", "--source", f"b={corpora['news']}:share=0.5"]
    failed_with(pack(sample, out, *twice), "is an input of both source `a` and source `b`", flat=True)
    missing = tmp_path / "none.toml"
    failed_with(pack(sample, out, "--recipe", missing), "cannot be read", flat=True)
    beside = pack(sample, out, "--recipe", missing, "--mix-seed", "3")
    failed_with(beside, "--mix-seed is not taken beside --recipe: set `seed` in the recipe", flat=True)


@pytest.mark.slow
def test_real_corpora_mixed_sixty_forty(qwen_tokenizer, reuters, ectsum, tmp_path):
    out = tmp_path / "real"
    args = ["--source", f"news={reuters}:share=0.6", "--source", f"calls={ectsum}:share=0.4"]
    ok(
        run(
            "pack",
            *args,
            "--tokenizer",
            qwen_tokenizer,
            "--out",
            out,
            "--seq-len",
            "1024",
            "--val-fraction",
            "0.01",
        )
    )
    found = shard_tokens_by_source(out)
    total = sum(found.values())
    assert abs(found["news"] / total - 0.6) <= 0.005 * 0.6
    assert abs(found["calls"] / total - 0.4) <= 0.005 * 0.4
    ok(run("verify", out))


@pytest.mark.slow
def test_a_plain_pack_records_each_input_and_verify_checks_it(sample, corpora, tmp_path):
    """Per-input documents and tokens without a recipe; moving tokens between two inputs is caught."""
    out = tmp_path / "plain"
    ok(pack(sample, out, str(corpora["news"]), str(corpora["calls"])))
    raw = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    m = Manifest.load(out)
    assert sum(i.num_docs for i in m.inputs) == m.documents.packed
    assert sum(i.num_tokens for i in m.inputs) == m.documents.tokens_packed
    assert all(i.num_docs > 0 and i.source is None for i in m.inputs) and m.mixture is None
    ok(run("verify", out))
    raw["inputs"][0]["num_tokens"] += 3
    raw["inputs"][1]["num_tokens"] -= 3
    (out / "manifest.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    failed_with(run("verify", out), f"input `{corpora['news']}`: the shards hold", flat=True)


def test_the_seed_changes_the_sample_and_only_the_seed_does():
    hashes = np.arange(1, 2001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    docs, lengths = np.arange(2000), np.full(2000, 10)
    chosen = {seed: take(docs, lengths, sample_keys(hashes, seed), 5000, None).docs for seed in (0, 0, 1)}
    again = take(docs, lengths, sample_keys(hashes, 0), 5000, None).docs
    assert len(chosen[0]) == 500 and (chosen[0] == again).all()
    assert set(chosen[0].tolist()) != set(chosen[1].tolist())


@pytest.mark.slow
def test_an_empty_source_is_refused_and_leaves_out_as_it_was(sample, corpora, tmp_path):
    """Its fix changes the inputs, which `--resume` refuses: the message does not offer it, no work is kept,
    and the fixed command runs as given."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "out"
    result = pack(
        sample, out, "--source", f"a={empty}:share=0.5", "--source", f"b={corpora['news']}:share=0.5"
    )
    failed_with(result, "source `a` has no documents to pack in `train`", "remove the source", flat=True)
    assert "--resume" not in result.output
    assert not out.exists()
    ok(pack(sample, out, "--source", f"b={corpora['news']}:share=1"))


@pytest.mark.slow
def test_a_gz_folder_and_a_csv_with_its_own_column_mix_and_verify(sample, corpora, tmp_path):
    """A source that is a folder of `.jsonl.gz` files beside a CSV source whose text is in another column,
    with a val split: packed, then verified with `--inputs` and with the inputs given back in order; given
    in another order, the message names the order `prep pack` read them in."""
    folder = tmp_path / "news"
    folder.mkdir()
    lines = corpora["news"].read_text(encoding="utf-8").splitlines(keepends=True)
    for k in range(2):
        with gzip.open(folder / f"part{k}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines[k::2])
    calls = tmp_path / "calls.csv"
    with calls.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "transcript"])
        for k, line in enumerate(corpora["calls"].read_text(encoding="utf-8").splitlines()):
            writer.writerow([k, json.loads(line)["text"]])
    out = tmp_path / "out"
    mix = [
        "--source",
        f"news={folder}:share=0.6",
        "--source",
        f"calls={calls}:share=0.4:text_field=transcript",
    ]
    ok(pack(sample, out, *mix))
    m = Manifest.load(out)
    assert [i.source for i in m.inputs] == ["news", "news", "calls"] and m.splits["val"].num_docs > 0
    assert [s.docs_in for s in m.mixture.sources] == [
        len(lines),
        len(corpora["calls"].read_text().splitlines()),
    ]
    _, tok = sample
    ok(run("verify", out, "--tokenizer", tok, "--inputs", "--source", folder, "--source", calls))
    swapped = run("verify", out, "--tokenizer", tok, "--source", calls, "--source", folder)
    failed_with(
        swapped,
        f"`{calls}` cannot be read as the manifest's `{folder / 'part0.jsonl.gz'}` (text field `text`)",
        "in the order `prep pack` read them",
        flat=True,
    )
    # The CSV source without its own field: the fix names the source's `text_field`, not only the flag.
    no_field = ["--source", f"news={folder}:share=0.6", "--source", f"calls={calls}:share=0.4"]
    failed_with(
        pack(sample, tmp_path / "no-field", *no_field),
        "has no `text` column (columns: id, transcript); set `--text-field` (or, for a mixture source, its own",
        flat=True,
    )


@pytest.mark.slow
def test_val_stays_within_the_val_fraction_when_train_is_sampled_down(sample, corpora, tmp_path):
    """A one-document source asked 10% binds the total: `train` keeps a few documents of the large source.
    `val` is then cut to what --val-fraction asks of the packed tokens (within a document, as every quota),
    not left with all the large source's val documents."""
    lines = corpora["news"].read_text(encoding="utf-8").splitlines(keepends=True)
    one = tmp_path / "one.jsonl"
    one.write_text(lines[0], encoding="utf-8")
    out = tmp_path / "out"
    said = ok(
        pack(sample, out, "--source", f"news={corpora['news']}:share=0.9", "--source", f"one={one}:share=0.1")
    )
    m = Manifest.load(out)
    train, val = m.splits["train"].num_tokens, m.splits["val"].num_tokens
    news = m.mixture.sources[0]
    assert news.docs_left_out > news.docs_in / 2  # the case: most of the large source is left out
    # The summary says why, and what keeps more.
    assert f"note: source `news` is sampled down: {news.docs_left_out:,} of its {news.docs_in:,}" in " ".join(
        said.split()
    )
    assert "raise max_epochs to keep more" in " ".join(said.split())
    tok = Tokenizer.from_file(str(sample[1] / "tokenizer.json"))
    longest = max(len(tok.encode(json.loads(line)["text"]).ids) + 1 for line in lines)
    assert val <= 0.05 / 0.95 * train + longest
    ok(run("verify", out))


def test_val_quotas_are_capped_by_the_val_fraction():
    def docs(*lengths: int) -> SourceDocs:
        n = len(lengths)
        return SourceDocs(np.arange(n), np.array(lengths, np.int64), np.arange(n, dtype=np.uint64))

    # Uncapped, the val documents allow 1,000 tokens at train's 90/10 shares; the cap is 5/95 of 1,000.
    quotas = val_quotas([900, 100], [docs(500, 400), docs(100)], 0.05)
    assert math.isclose(sum(quotas), 1000 * 0.05 / 0.95) and math.isclose(quotas[0] / sum(quotas), 0.9)
    assert math.isclose(sum(val_quotas([900, 100], [docs(50, 40), docs(10)], 0.5)), 100)  # documents bind


def test_inspect_shows_the_mixture_and_keeps_every_column_in_a_log(mixed):
    said = ok(run("inspect", mixed))
    assert "segs/row" in said and "…" not in said  # not cut at 80 columns when not on a terminal
    assert "mixture (share of train tokens)" in said
    for s in Manifest.load(mixed).mixture.sources:
        assert f"{s.name} " in said and f"{s.achieved_share:.2%}" in said
