"""`prep pack` writes the same bytes as the code these sha256 were recorded from, on the sample and both corpora.

The shard hashes were recorded before `prep pack` was split into stages, so any refactor that changes an
output byte fails here. The manifest records where the inputs and the tokenizer were read from; those folders
are replaced by placeholders before hashing, and so is each input's modification time (`mtime_ns`, which a
checkout or copy sets). The manifest hashes were recorded again when the manifest began to record each
input's size, mtime and sha256 (the shards kept theirs). The card is left out: it embeds the output folder's
path.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep.cli import app
from shared.contract import MANIFEST_NAME, SHARD_SUFFIX
from tests.conftest import SHARED_DATA

SAMPLE_DEFAULT: list[str] = []
SAMPLE_VARIED = [
    "--seq-len",
    "64",
    "--strategy",
    "wrapped",
    "--val-fraction",
    "0.2",
    "--bos-token",
    "<|im_start|>",
]
CORPUS = ["--seq-len", "1024"]

RECORDED = {
    "sample-default": {
        "train-00000-of-00001.arrow": "724c8d972d2312e5bf9da67267a722b5a84d9f545de97cf82c0bcbaa0bf339f5",
        "manifest.json": "bfe113465746f4d8e270e67910b875b7f049ecfeee129017c08da7f1b96ea338",
    },
    "sample-varied": {
        "train-00000-of-00001.arrow": "179d08bf43f0dae9113372ebee339ba444fbb2b6e55bd83fc56325f888742c92",
        "val-00000-of-00001.arrow": "9a0020e6b8c2de3be821d775470f68ade9de4d4b0980f2fd1c4de9e126b36aa8",
        "manifest.json": "3c835503d0404e1b501724a494bfd4ce6760fc2fc0ee10b04876b92ae497fa6e",
    },
    "reuters-1024": {
        "train-00000-of-00001.arrow": "074397662b8fac828746cca419ca78e9ccfba7cf6a4bfc80f25c595c6d9a66ad",
        "manifest.json": "a3bb6697895ca8f8e8d0b144273d0e2a7a43ff227213a3f7c1bd79dee60f3e81",
    },
    "ectsum-1024": {
        "train-00000-of-00001.arrow": "a9665d5d0291dc663df256beea139201fa047c251ff924ae0360e4a36d55e8a3",
        "manifest.json": "0fc11598083ea23636e4de63d069510e90106bf0c9f9e60e04b44f81f4091d57",
    },
}
"""sha256 of every shard and of the neutralised manifest.json, per configuration, recorded at the first commit;
the manifests' re-recorded when each input began to record its size, mtime and sha256, and the documents and
tokens it gave (`InputInfo.num_docs`, `num_tokens`), with every shard hash unchanged."""


def output_hashes(out: Path, folders: dict[str, Path]) -> dict[str, str]:
    """sha256 of each shard in ``out`` and of its manifest, with each of ``folders`` replaced by its key."""
    hashes = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob(f"*{SHARD_SUFFIX}"))
    }
    manifest = (out / MANIFEST_NAME).read_text(encoding="utf-8")
    for placeholder, folder in folders.items():
        manifest = manifest.replace(str(folder), placeholder)
    manifest = re.sub(r'"mtime_ns": \d+', '"mtime_ns": "<MTIME>"', manifest)
    hashes[MANIFEST_NAME] = hashlib.sha256(manifest.encode()).hexdigest()
    return hashes


def pack_hashes(inputs: list[Path], tokenizer: Path, out: Path, options: list[str], folders: dict) -> dict:
    args = ["pack", *map(str, inputs), "--tokenizer", str(tokenizer), "--out", str(out), *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return output_hashes(out, folders)


@pytest.mark.parametrize(
    ("name", "options"), [("sample-default", SAMPLE_DEFAULT), ("sample-varied", SAMPLE_VARIED)]
)
def test_sample_shards_are_byte_identical(sample, tmp_path, name, options):
    corpus, tokenizer = sample
    got = pack_hashes([corpus], tokenizer, tmp_path / "out", options, {"<SAMPLE>": corpus.parent.parent})
    assert got == RECORDED[name]


@pytest.mark.corpus
@pytest.mark.slow
@pytest.mark.parametrize("corpus", ["reuters", "ectsum"])
def test_corpus_shards_are_byte_identical(request, qwen_tokenizer, tmp_path, corpus):
    path = request.getfixturevalue(corpus)
    got = pack_hashes([path], qwen_tokenizer, tmp_path / "out", CORPUS, {"<DATA>": SHARED_DATA})
    assert got == RECORDED[f"{corpus}-1024"]


def test_a_changed_byte_is_caught(sample, tmp_path):
    """Negative control: one flipped byte in a shard, or another input folder in the manifest, changes a hash."""
    corpus, tokenizer = sample
    out = tmp_path / "out"
    folders = {"<SAMPLE>": corpus.parent.parent}
    before = pack_hashes([corpus], tokenizer, out, SAMPLE_DEFAULT, folders)
    shard = next(out.glob(f"*{SHARD_SUFFIX}"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert output_hashes(out, folders)[shard.name] != before[shard.name]
    assert output_hashes(out, {})[MANIFEST_NAME] != before[MANIFEST_NAME]


if __name__ == "__main__":  # prints the RECORDED table from the code as it is now
    import json
    import sys
    import tempfile

    from prep.sample import write_sample
    from tests.conftest import ECTSUM, QWEN_TOKENIZER, REUTERS

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        corpus, tokenizer = write_sample(base / "sample")
        table = {
            name: pack_hashes([corpus], tokenizer, base / name, opts, {"<SAMPLE>": corpus.parent.parent})
            for name, opts in (("sample-default", SAMPLE_DEFAULT), ("sample-varied", SAMPLE_VARIED))
        }
        if "--corpus" in sys.argv:
            for name, path in (("reuters-1024", REUTERS), ("ectsum-1024", ECTSUM)):
                table[name] = pack_hashes(
                    [path], QWEN_TOKENIZER, base / name, CORPUS, {"<DATA>": SHARED_DATA}
                )
    print(json.dumps(table, indent=4))
