"""`prep pack` on conversations and prompt/completion pairs, end to end: the ids stored equal the chat
template's rendering (transformers' `apply_chat_template` where it is installed), content's special-token text
stays text and is never a target, labels cover exactly the trained turns' content plus their closing token,
long conversations are dropped or truncated and counted, `prep verify` proves the label mask against a fresh
rendering, and a killed pack resumes to the same bytes.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prep.chat import IGNORE
from prep.verify import VerifyConfig, verify_dataset
from shared.checks import RowCheckError, TokenRules, check_batch
from shared.contract import LABELS
from shared.manifest import Manifest
from shared.reader import PackedDataset
from tests.conftest import QWEN_TOKENIZER
from tests.prep.clirun import failed_with, ok, run
from tests.prep.test_chat import BENIGN, INJECTION, folders, qwen  # noqa: F401  (fixtures)
from tests.prep.test_verify import corrupt

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Translate 'chat' to French."},
    {"role": "assistant", "content": "chat (m.)"},
]


@pytest.fixture(autouse=True)
def _needs_qwen(qwen_tokenizer):
    """Every test here packs with Qwen2.5's tokenizer and chat template (../shared/data): without them they
    skip (fail in CI), and they are `corpus` tests."""


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def pack(inputs: list[Path], tokenizer: Path, out: Path, *extra: str) -> Manifest:
    ok(run("pack", *inputs, "--tokenizer", tokenizer, "--out", out, "--seq-len", "256", *extra))
    return Manifest.load(out)


def stored(out: Path) -> dict[int, tuple[list[int], list[int]]]:
    """``doc_id -> (ids, labels)`` of every stored segment (conversations are never split)."""
    found = {}
    dataset = PackedDataset(out)
    for split in map(dataset.split, dataset.split_names):
        for r in range(split.num_rows):
            row = split.row(r)
            for k, doc in enumerate(row.doc_ids.tolist()):
                a, b = row.cu_seqlens[k], row.cu_seqlens[k + 1]
                found[doc] = (row.input_ids[a:b].tolist(), row.labels[a:b].tolist())
    return found


def target_runs(labels: list[int]) -> list[list[int]]:
    runs, run_ = [], []
    for label in labels:
        if label != IGNORE:
            run_.append(label)
        elif run_:
            runs.append(run_)
            run_ = []
    return runs + ([run_] if run_ else [])


def decoded_targets(qwen, labels: list[int]) -> list[str]:  # noqa: F811
    return [qwen.decode(r, skip_special_tokens=False) for r in target_runs(labels)]


@pytest.fixture(scope="module")
def auto():
    transformers = pytest.importorskip("transformers")
    return transformers


# --- ids and labels ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen", "llama3"])
def test_pack_ids_equal_apply_chat_template(folders, auto, family, tmp_path):  # noqa: F811
    """Benign conversations through `prep pack`: each stored document is apply_chat_template's ids + EOS."""
    hf = auto.AutoTokenizer.from_pretrained(str(folders[family]))
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in BENIGN])
    # The llama3-style template closes turns with <|endoftext|>: the pack's EOS must be another token.
    eos = "<|endoftext|>" if family == "qwen" else "<|im_end|>"
    m = pack([source], folders[family], tmp_path / "out", "--eos-token", eos)
    assert m.options.format == "chat" and m.inputs[0].record_format == "chat"
    docs = stored(tmp_path / "out")
    assert sorted(docs) == list(range(len(BENIGN)))
    for i, messages in enumerate(BENIGN):
        want = list(hf.apply_chat_template(messages, tokenize=True, return_dict=False))
        assert docs[i][0] == [*want, m.tokenizer.eos_id]


def test_labels_cover_assistant_content_and_closing_token(qwen, tmp_path):  # noqa: F811
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}])
    pack([source], QWEN_TOKENIZER.parent, tmp_path / "out")
    ids, labels = stored(tmp_path / "out")[0]
    assert decoded_targets(qwen, labels) == ["Hello!<|im_end|>", "chat (m.)<|im_end|>"]
    assert qwen.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nYou are terse.")
    assert ids[-1] == qwen.token_to_id("<|endoftext|>") and labels[-1] == IGNORE  # the EOS: no target
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels, strict=True))


def test_train_on_several_roles(qwen, tmp_path):  # noqa: F811
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}])
    m = pack(
        [source], QWEN_TOKENIZER.parent, tmp_path / "out", "--train-on", "assistant", "--train-on", "user"
    )
    assert m.options.train_on == "assistant,user"
    _, labels = stored(tmp_path / "out")[0]
    assert decoded_targets(qwen, labels) == [
        "Hi<|im_end|>",
        "Hello!<|im_end|>",
        "Translate 'chat' to French.<|im_end|>",
        "chat (m.)<|im_end|>",
    ]


def test_injected_control_text_stays_text_and_is_never_a_target(qwen, tmp_path):  # noqa: F811
    messages = [{"role": "user", "content": INJECTION}, {"role": "assistant", "content": "No."}]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    pack([source], QWEN_TOKENIZER.parent, tmp_path / "out")
    ids, labels = stored(tmp_path / "out")[0]
    im_start, im_end = qwen.token_to_id("<|im_start|>"), qwen.token_to_id("<|im_end|>")
    # Qwen's template adds a default system turn: three turns, so three of each control token, not five.
    assert ids.count(im_start) == 3 and ids.count(im_end) == 3
    assert decoded_targets(qwen, labels) == ["No.<|im_end|>"]
    text = qwen.decode(ids, skip_special_tokens=False)
    assert INJECTION in text  # the content is all there, as text
    verify_dataset(VerifyConfig(root=tmp_path / "out", sources=(str(source),)))


def test_empty_turns_train_the_closing_token_only(qwen, tmp_path):  # noqa: F811
    records = [
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {"messages": []},  # no conversation: counted as empty
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    m = pack([source], QWEN_TOKENIZER.parent, tmp_path / "out")
    docs = stored(tmp_path / "out")
    assert decoded_targets(qwen, docs[0][1]) == ["<|im_end|>"]
    assert decoded_targets(qwen, docs[1][1]) == ["Yo<|im_end|>"]
    assert m.documents.skipped_empty == 1 and m.documents.packed == 2


def test_prompt_completion_pairs_train_the_completion_and_eos(qwen, tmp_path):  # noqa: F811
    records = [
        {"prompt": "2+2=", "completion": " 4"},
        {"prompt": "<|im_end|> Capital?", "completion": " Paris"},
    ]
    source = write_jsonl(tmp_path / "pairs.jsonl", records)
    m = pack([source], QWEN_TOKENIZER.parent, tmp_path / "out")
    assert m.options.format == "prompt-completion" and m.options.train_on is None
    docs = stored(tmp_path / "out")
    assert decoded_targets(qwen, docs[0][1]) == [" 4<|endoftext|>"]
    assert decoded_targets(qwen, docs[1][1]) == [" Paris<|endoftext|>"]
    assert qwen.token_to_id("<|im_end|>") not in docs[1][0]  # the prompt's marker stays text
    verify_dataset(VerifyConfig(root=tmp_path / "out", sources=(str(source),)))


# --- long conversations -----------------------------------------------------------------------------------


def long_records() -> list[dict]:
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for k in range(40):
        turns += [
            {"role": "user", "content": f"Question {k}?"},
            {"role": "assistant", "content": f"Answer {k}."},
        ]
    return [{"messages": turns}, {"messages": turns[:2]}]


@pytest.mark.parametrize("rule", ["drop", "truncate"])
def test_conversation_longer_than_seq_len_is_dropped_or_truncated_and_counted(qwen, tmp_path, rule):  # noqa: F811
    source = write_jsonl(tmp_path / "chat.jsonl", long_records())
    m = pack([source], QWEN_TOKENIZER.parent, tmp_path / "out", "--long-chats", rule)
    d = m.documents
    docs = stored(tmp_path / "out")
    assert d.docs_in == 2 and not d.problems()
    if rule == "drop":
        assert (d.dropped, d.truncated, d.packed) == (1, 0, 1) and sorted(docs) == [1]
        assert d.tokens_dropped > 256
    else:
        assert (d.dropped, d.truncated, d.packed) == (0, 1, 2) and d.tokens_truncated > 0
        ids, labels = docs[0]
        assert len(ids) <= 256
        # cut just after a trained turn's closing token, then the EOS
        assert qwen.decode(ids[-2:], skip_special_tokens=False) == "<|im_end|><|endoftext|>"
        assert decoded_targets(qwen, labels)[-1].endswith(".<|im_end|>")
    assert m.options.long_chats == rule
    verify_dataset(VerifyConfig(root=tmp_path / "out", sources=(str(source),)))


def test_many_conversations_are_never_cut_across_rows(tmp_path):
    """bfd may cut documents to fill rows; conversations are packed whole, and verify re-renders them all."""
    records = [
        {
            "messages": [
                {"role": "user", "content": f"Q{k} " * (1 + k % 13)},
                {"role": "assistant", "content": f"A{k}."},
            ]
        }
        for k in range(300)
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    m = pack([source], QWEN_TOKENIZER.parent, tmp_path / "out", "--val-fraction", "0.1")
    assert m.splits["train"].num_segments == m.splits["train"].num_docs
    assert m.splits["val"].num_segments == m.splits["val"].num_docs
    report = verify_dataset(VerifyConfig(root=tmp_path / "out", sources=(str(source),), sample=300))
    assert report.num_source_records == 300


def test_wrapped_strategy_is_refused_for_conversations(tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}])
    result = run(
        "pack", source, "--tokenizer", QWEN_TOKENIZER.parent, "--out", tmp_path / "o", "--strategy", "wrapped"
    )
    failed_with(result, "conversations are never cut", flat=True)


# --- inputs and formats -----------------------------------------------------------------------------------


def test_chat_from_parquet_and_saved_dataset_equals_jsonl(tmp_path):
    records = [{"messages": m} for m in BENIGN if all(x["content"] for x in m)]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", records)
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    assert pa.types.is_list(pq.read_schema(parquet).field("messages").type)
    want = stored_after(jsonl, tmp_path / "a")
    assert stored_after(parquet, tmp_path / "b") == want
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    assert stored_after(tmp_path / "saved", tmp_path / "c") == want


def test_prompt_completion_pairs_from_parquet_equal_jsonl(tmp_path):
    records = [
        {"prompt": "2+2=", "completion": " 4", "id": 1},
        {"prompt": "Hi", "completion": " there", "id": 2},
    ]
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", records)
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    assert stored_after(parquet, tmp_path / "b") == stored_after(jsonl, tmp_path / "a")
    assert Manifest.load(tmp_path / "b").inputs[0].record_format == "prompt-completion"


def stored_after(source: Path, out: Path) -> dict:
    pack([source], QWEN_TOKENIZER.parent, out)
    return stored(out)


def test_auto_decides_per_file_and_text_beside_chat_is_trained_throughout(qwen, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv(
        "PREP_ENCODER", "tokenizers"
    )  # the reference encoder: exact, and no fast encoder to build
    text = write_jsonl(tmp_path / "docs.jsonl", [{"text": "A plain document."}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}])
    result = run("pack", text, chat, "--tokenizer", QWEN_TOKENIZER.parent, "--out", tmp_path / "o")
    failed_with(result, "never splits a document", "--long-docs truncate", flat=True)
    m = pack([text, chat], QWEN_TOKENIZER.parent, tmp_path / "out", "--long-docs", "truncate")
    assert m.options.format == "mixed"
    assert [i.record_format for i in m.inputs] == [None, "chat"]
    docs = stored(tmp_path / "out")
    ids, labels = docs[0]
    assert labels == [IGNORE, *ids[1:]]  # a document: every token but the first, EOS included
    assert decoded_targets(qwen, docs[1][1]) == ["Hello!<|im_end|>", "chat (m.)<|im_end|>"]
    assert m.splits["train"].num_target_tokens == sum(
        sum(label != IGNORE for label in lab) for _, lab in docs.values()
    )
    verify_dataset(VerifyConfig(root=tmp_path / "out", sources=(str(text), str(chat))))


def test_plain_pack_manifest_says_nothing_of_chat(tmp_path, monkeypatch):
    monkeypatch.setenv("PREP_ENCODER", "tokenizers")
    text = write_jsonl(tmp_path / "docs.jsonl", [{"text": "A plain document."}])
    pack([text], QWEN_TOKENIZER.parent, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not {"format", "train_on", "long_chats", "chat_template"} & set(raw["options"])
    assert "record_format" not in raw["inputs"][0]


def test_bad_messages_stop_the_run_or_are_counted(tmp_path):
    records = [{"messages": MULTI_TURN}, {"messages": [{"role": "user", "content": 3}]}]
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    args = ("pack", source, "--tokenizer", QWEN_TOKENIZER.parent, "--format", "chat", "--seq-len", "256")
    failed_with(run(*args, "--out", tmp_path / "a"), "chat.jsonl:2", "`content` must be a string", flat=True)
    ok(run(*args, "--out", tmp_path / "b", "--skip-invalid"))
    assert Manifest.load(tmp_path / "b").documents.skipped_invalid == 1


def test_chat_format_of_a_text_file_is_refused(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("hello", encoding="utf-8")
    result = run(
        "pack", path, "--tokenizer", QWEN_TOKENIZER.parent, "--out", tmp_path / "o", "--format", "chat"
    )
    failed_with(result, "its records are text", "--format text", flat=True)


def test_template_writing_the_eos_is_refused(folders, tmp_path):  # noqa: F811
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}])
    result = run(
        "pack",
        source,
        "--tokenizer",
        folders["llama3"],
        "--out",
        tmp_path / "o",
        "--eos-token",
        "<|endoftext|>",
    )
    failed_with(result, "writes '<|endoftext|>'", "Pass another --eos-token", flat=True)


# --- checks and verify --------------------------------------------------------------------------------------


def test_row_check_accepts_masked_labels_for_chat_datasets_only():
    ids = [5, 6, 7, 2]
    batch = pa.RecordBatch.from_pylist(
        [
            {
                "input_ids": ids,
                "labels": [IGNORE, IGNORE, 7, IGNORE],
                "position_ids": [0, 1, 2, 3],
                "cu_seqlens": [0, 4],
                "doc_ids": [0],
            }
        ]
    )
    rules = {"seq_len": 8, "eos_id": 2}
    with pytest.raises(RowCheckError, match="labels check failed"):
        check_batch(batch, TokenRules(**rules), shard="s")
    check_batch(batch, TokenRules(**rules, masked_labels=True), shard="s")
    for labels in ([5, IGNORE, 7, IGNORE], [IGNORE, 9, 7, IGNORE]):  # a first-token target; a wrong value
        bad = batch.set_column(1, LABELS, pa.array([labels], batch.schema.field(LABELS).type))
        with pytest.raises(RowCheckError, match="labels check failed"):
            check_batch(bad, TokenRules(**rules, masked_labels=True), shard="s")


@pytest.fixture(scope="module")
def chat_pack_once(qwen_tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    """Two conversations packed once for the module (``qwen_tokenizer``: skipped without ../shared/data)."""
    folder = tmp_path_factory.mktemp("chat-pack")
    source = write_jsonl(folder / "chat.jsonl", [{"messages": MULTI_TURN}, {"messages": BENIGN[0]}])
    pack([source], qwen_tokenizer.parent, folder / "out")
    return folder / "out", source


@pytest.fixture
def chat_pack(chat_pack_once, tmp_path) -> tuple[Path, Path]:
    """This test's copy of the module's chat pack, which it may damage; the source is only read."""
    out, source = chat_pack_once
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "out", source


def test_verify_catches_a_moved_target_against_a_fresh_rendering(qwen, chat_pack):  # noqa: F811
    out, source = chat_pack
    verify_dataset(VerifyConfig(root=out, sources=(str(source),)))

    def move_target(rows):
        ids, labels = rows[0]["input_ids"], rows[0][LABELS]
        user = int(np.flatnonzero(ids == qwen.token_to_id("Hi"))[0])
        first_target = int(np.flatnonzero(labels != IGNORE)[0])
        labels[user], labels[first_target] = ids[user], IGNORE  # same count: only a re-rendering sees it

    corrupt(out, move_target)
    verify_dataset(VerifyConfig(root=out))  # rows and counts still hold
    with pytest.raises(RowCheckError, match="a target outside every trained turn"):
        verify_dataset(VerifyConfig(root=out, sources=(str(source),)))


def test_verify_catches_an_extra_target_by_its_count(chat_pack):
    out, _ = chat_pack

    def unmask(rows):
        labels = rows[0][LABELS]
        k = int(np.flatnonzero(labels == IGNORE)[1])
        labels[k] = rows[0]["input_ids"][k]

    corrupt(out, unmask)
    with pytest.raises(RowCheckError, match="num_target_tokens"):
        verify_dataset(VerifyConfig(root=out))


def test_verify_catches_a_special_id_from_content(qwen, chat_pack):  # noqa: F811
    out, source = chat_pack
    endoftext = qwen.token_to_id("<|endoftext|>")
    box = qwen.token_to_id("<|box_start|>")  # special, and not the template's

    def plant(rows):
        rows[0]["input_ids"][3] = rows[0][LABELS][3] = box if rows[0][LABELS][3] != IGNORE else box
        rows[0][LABELS][3] = IGNORE

    corrupt(out, plant)
    with pytest.raises(RowCheckError, match="special check failed"):
        verify_dataset(VerifyConfig(root=out))
    assert endoftext != box


# --- resume ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_chat_pack_resumes_byte_identical(tmp_path, monkeypatch):
    from tests.prep.test_crash_resume import folder_bytes, resume_in_process, run_cli

    records = [
        {
            "messages": [
                {"role": "user", "content": f"Question {k} " * (1 + k % 7)},
                {"role": "assistant", "content": f"Answer {k}."},
            ]
        }
        for k in range(600)
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    args = [
        "pack",
        str(source),
        "--tokenizer",
        str(QWEN_TOKENIZER.parent),
        "--seq-len",
        "256",
        "--rows-per-shard",
        "20",
        "--val-fraction",
        "0.1",
        "--long-chats",
        "truncate",
    ]
    reference = tmp_path / "ref" / "out"
    assert run_cli([*args, "--out", str(reference)]).returncode == 0
    for kill_at in ("tokenize:2", "shard:2", "worker:2"):
        out = tmp_path / kill_at.replace(":", "") / "out"
        killed = run_cli([*args, "--out", str(out), "--workers", "2"], kill_at=kill_at)
        if kill_at.startswith("worker"):  # a rendering worker dies as the out-of-memory killer would kill it
            assert killed.returncode == 1 and "a tokenizing worker process died" in killed.stderr, (
                killed.stderr
            )
        else:
            assert killed.returncode == -signal.SIGKILL, killed.stderr
        resume_in_process([*args, "--out", str(out), "--resume", "--workers", "2"], monkeypatch)
        assert folder_bytes(out) == folder_bytes(reference)


# --- inspect and card -------------------------------------------------------------------------------------


def test_inspect_marks_trained_masked_and_special_tokens(chat_pack):
    out, _ = chat_pack
    shown = ok(run("inspect", out, "--row", "0"))
    assert "«Hello!»«⟦<|im_end|>⟧»" in shown  # trained content, then its trained closing token
    assert "⟦<|im_start|>⟧user\nHi⟦<|im_end|>⟧" in shown  # a masked turn between special tokens


def test_card_reports_target_share_and_conversation_lengths(chat_pack):
    out, _ = chat_pack
    card = (out / "README.md").read_text(encoding="utf-8")
    m = Manifest.load(out)
    s = m.splits["train"]
    assert "## Conversations" in card
    assert (
        f"| train | {s.num_tokens:,} | {s.num_target_tokens:,} | {s.num_target_tokens / s.num_tokens:.2%} |"
        in card
    )
    assert "| tokens | conversations |" in card
    assert "--long-chats drop --format chat --train-on assistant" in card


def test_ray_executor_refuses_conversations_with_the_fix(tmp_path):
    pytest.importorskip("ray")
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}])
    result = run(
        "pack", source, "--tokenizer", QWEN_TOKENIZER.parent, "--out", tmp_path / "o", "--executor", "ray"
    )
    failed_with(result, "`--executor local`", flat=True)
    assert not (tmp_path / "o").exists()


def test_a_mixture_of_conversations_meets_its_shares_and_verifies(folders, tmp_path):  # noqa: F811
    """Two chat sources mixed 0.6/0.4: a chat record is hashed and sampled like a document, and verify
    --source accepts the conversations the mixture left out (its per-source counts cover them)."""
    for name in ("a", "b"):
        write_jsonl(
            tmp_path / f"{name}.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": f"{name} question {i} " + "word " * (i % 23)},
                        {"role": "assistant", "content": f"{name} answer {i} " + "reply " * (i % 31)},
                    ]
                }
                for i in range(120)
            ],
        )
    out = tmp_path / "mixed"
    sources = [
        "--source",
        f"a={tmp_path / 'a.jsonl'}:share=0.6",
        "--source",
        f"b={tmp_path / 'b.jsonl'}:share=0.4",
    ]
    ok(
        run(
            "pack",
            *sources,
            "--tokenizer",
            folders["qwen"],
            "--out",
            out,
            "--seq-len",
            "256",
        )
    )
    m = Manifest.load(out)
    assert m.options.masked_labels and m.mixture is not None
    achieved = {s.name: s.achieved_share for s in m.mixture.sources}
    assert achieved["a"] == pytest.approx(0.6, abs=0.01) and achieved["b"] == pytest.approx(0.4, abs=0.01)
    assert any(s.docs_left_out for s in m.mixture.sources)  # b is downsampled: the case verify must accept
    ok(
        run(
            "verify",
            out,
            "--source",
            tmp_path / "a.jsonl",
            "--source",
            tmp_path / "b.jsonl",
            "--sample",
            "240",
        )
    )
