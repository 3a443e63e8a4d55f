"""The bundled default: a synthetic corpus and a small byte-level BPE tokenizer, generated offline.

`prep demo` and the tests use these so that the whole pipeline runs on a fresh machine with no network
and no licensed data. Both are deterministic: the same call writes byte-identical files.

The corpus is made to exercise what goes wrong in packing pipelines: documents far longer than a row,
one-line documents, literal special-token text (``<|endoftext|>``, ``<|im_start|>``) inside a document,
non-ASCII text, and an empty record.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SAMPLE_EOS = "<|endoftext|>"

_SUBJECTS = (
    "The central bank",
    "A small trader",
    "The committee",
    "Our engineering team",
    "The harbour master",
    "Analysts",
    "The cooperative",
    "A spokeswoman",
    "The board",
    "Farmers in the north",
)
_VERBS = ("reported", "expected", "announced", "questioned", "measured", "delayed", "confirmed", "revised")
_OBJECTS = (
    "higher cocoa arrivals",
    "a quarterly loss of 4.2 million dlrs",
    "new export quotas",
    "the packing of sequences",
    "steady demand for copper",
    "a 12 pct rise in output",
    "the merger talks",
    "lower freight rates",
    "record wheat shipments",
    "a dividend of 15 cts",
)
_TAILS = (
    "this week.",
    "after the meeting.",
    "despite the drought.",
    "in early trading.",
    "for the year.",
    "according to officials.",
    "at the close.",
    "without further comment.",
)
_ODDITIES = (
    "The log line read <|endoftext|> and nothing else.",
    "A chat transcript began with <|im_start|>user and ended with <|im_end|>.",
    "Prices in Zurich (Zürich) rose; naïve estimates missed the café trade.",
    "Tokens like </s> and <eos> are text here.",
)


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.03:
        return rng.choice(_ODDITIES)
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"


def sample_documents(num_docs: int = 400, seed: int = 0) -> list[str]:
    """Documents with a long-tailed length distribution, from one line to several thousand words."""
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        num_sentences = 1 + int(rng.paretovariate(1.2) * 3) if i % 50 else 250 + rng.randrange(200)
        paragraphs = []
        while num_sentences > 0:
            k = min(num_sentences, 1 + rng.randrange(6))
            paragraphs.append(" ".join(_sentence(rng) for _ in range(k)))
            num_sentences -= k
        docs.append("\n\n".join(paragraphs))
    docs[7] = "The log line read <|endoftext|> and then <|im_start|>system, all as plain text."
    return docs


def train_sample_tokenizer(texts: list[str], vocab_size: int = 1024) -> Tokenizer:
    """A Qwen2-style byte-level BPE (NFC, byte-level pre-tokenizer) trained on ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def write_sample(folder: str | Path, num_docs: int = 400, seed: int = 0) -> tuple[Path, Path]:
    """Write ``corpus/sample.jsonl`` and ``tokenizer/`` under ``folder``; return (corpus file, tokenizer dir)."""
    folder = Path(folder)
    corpus_dir, tok_dir = folder / "corpus", folder / "tokenizer"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    docs = sample_documents(num_docs, seed)
    corpus = corpus_dir / "sample.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"sample-{i:04d}", "text": text}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"id": "sample-empty", "text": ""}) + "\n")
    tokenizer = train_sample_tokenizer(docs)
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    config = {"eos_token": SAMPLE_EOS, "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return corpus, tok_dir
