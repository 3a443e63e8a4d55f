"""`train eval` and the evals of `train run`: figures equal plain transformers' on the same documents
(float64, each document or fragment alone), bits per byte equal a count from the text, and the run
evaluates every named set at step 0 and after training."""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from prep.pipeline import PackConfig, pack
from shared.contract import IGNORE_INDEX
from shared.reader import PackedDataset
from train.cli import app
from train.compare import EvalConfig, ModelRow, run_eval, run_eval_sets
from train.config import ConfigError, RunConfig, build_run_config, load_toml
from train.eval import EvalError, read_documents, rolling_windows, token_byte_lengths
from train.loop import train
from train.model import load_model, tiny_qwen2_config

SEED = 3


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def packed_64(sample, tmp_path_factory) -> Path:
    """Thirty short documents of the sample packed at seq_len 64 without a val split: a second eval
    set (its train split), with the same tokenizer."""
    corpus, tokenizer = sample
    folder = tmp_path_factory.mktemp("packed")
    small = folder / "small.jsonl"
    small.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(True)[1:31]), encoding="utf-8")
    out = folder / "sample-64"
    pack(PackConfig(inputs=(str(small),), tokenizer=str(tokenizer), out=out, seq_len=64, val_fraction=0.0))
    return out


@pytest.fixture(scope="module")
def trained(packed_sample, packed_64, tmp_path_factory) -> Path:
    """A 2-step LoRA run with a checkpoint at each step, evaluating `val` and `other` at steps 0 and 2."""
    out = tmp_path_factory.mktemp("runs") / "r1"
    cfg = RunConfig(
        data=packed_sample,
        out=out,
        model="tiny-qwen2",
        max_steps=2,
        batch_size=2,
        lr=3e-2,
        eval_every=2,
        save_every=1,
        eval_data=(("other", packed_64),),
        device="cpu",
        attn="sdpa",
        lora_r=8,
        lora_alpha=16,
        seed=SEED,
    )
    train(cfg, log=quiet)
    return out


def reference_model(vocab_size: int, adapter: Path | None = None) -> torch.nn.Module:
    """Plain transformers in float64 with eager attention, holding the weights `train` builds for SEED
    (and the adapter merged in)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = load_model("tiny-qwen2", vocab_size=vocab_size, attn="sdpa", seed=SEED)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(vocab_size), attn_implementation="eager")
    model.load_state_dict(ours.state_dict())
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).double().merge_and_unload()
    return model.double().eval()


@torch.no_grad()
def nll_alone(model, input_ids: np.ndarray, labels: np.ndarray, scored_from: int = 1) -> tuple[float, int]:
    """Summed NLL of the targets ``labels[scored_from:]`` of one sequence run alone (positions from 0)."""
    ids = torch.from_numpy(input_ids.astype(np.int64))[None]
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    targets = torch.from_numpy(labels.astype(np.int64))
    total, count = 0.0, 0
    for t in range(max(scored_from, 1), len(targets)):
        if targets[t] != IGNORE_INDEX:
            total -= float(logp[t - 1, targets[t]])
            count += 1
    return total, count


def packed_reference(model, split, num_rows: int) -> tuple[float, int]:
    """Each segment (a document, or a fragment of one) of the first rows, run alone."""
    total, count = 0.0, 0
    for index in range(num_rows):
        row = split.row(index)
        for k in range(row.num_segments):
            a, b = row.cu_seqlens[k], row.cu_seqlens[k + 1]
            nll, n = nll_alone(model, row.input_ids[a:b], row.labels[a:b])
            total, count = total + nll, count + n
    return total, count


def strided_reference(model, ids: np.ndarray, window: int, stride: int) -> tuple[float, int]:
    """The strided perplexity of the transformers docs: windows of ``window`` tokens every ``stride``,
    each scoring the tokens no earlier window scored."""
    total, count, prev_end, begin = 0.0, 0, 1, 0
    while True:
        end = min(begin + window, len(ids))
        nll, n = nll_alone(model, ids[begin:end], ids[begin:end], scored_from=prev_end - begin)
        total, count, prev_end = total + nll, count + n, end
        if end == len(ids):
            return total, count
        begin += stride


def close(ours: float, reference: float) -> None:
    assert ours == pytest.approx(reference, rel=2e-5, abs=1e-9), (ours, reference)


@pytest.mark.slow
def test_packed_figures_equal_plain_transformers_per_set_base_and_adapter(packed_sample, packed_64, trained):
    cfg = EvalConfig(
        data=(("val", packed_sample), ("other", packed_64)),
        adapters=(trained / "adapter",),
        max_rows=12,
        batch_size=3,
        device="cpu",
        attn="sdpa",
    )
    report = run_eval(cfg, log=quiet)
    assert [r.name for r in report.rows] == ["base", str(trained / "adapter")]
    assert report.base_model == "tiny-qwen2"  # read from the run the adapter belongs to
    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    splits = {
        "val": PackedDataset(packed_sample).split("val"),
        "other": PackedDataset(packed_64).split("train"),
    }
    for row, adapter in (("base", None), (str(trained / "adapter"), trained / "adapter")):
        model = reference_model(vocab_size, adapter)
        for name, split in splits.items():
            figures = report.results[row][name]
            nll, count = packed_reference(model, split, 12)
            assert figures.num_targets == count and figures.num_rows == 12
            close(figures.nll_sum, nll)
            close(figures.ppl, math.exp(nll / count))
    # negative control: the adapter moved the figures well beyond the tolerance
    base, tuned = report.results["base"]["val"], report.results[str(trained / "adapter")]["val"]
    assert abs(tuned.loss - base.loss) > 1e-2


@pytest.mark.slow
def test_doc_level_equals_strided_plain_transformers_on_the_source_documents(sample, packed_sample, trained):
    from tokenizers import Tokenizer

    corpus, tokenizer_dir = sample
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # as `prep pack` encodes: special-token text is text
    manifest = PackedDataset(packed_sample).manifest
    cfg = EvalConfig(
        data=(("val", packed_sample),),
        adapters=(trained / "checkpoints" / "step-00000002",),
        doc_level=True,
        window=64,
        stride=28,
        device="cpu",
        attn="sdpa",
    )
    report = run_eval(cfg, log=quiet)
    documents = report.sets[0].documents
    assert len(documents) == PackedDataset(packed_sample).manifest.splits["val"].num_docs
    assert max(d.num_fragments for d in documents) > 5  # long documents rejoined across rows
    for row, adapter in (("base", None), (cfg.adapters[0].as_posix(), cfg.adapters[0] / "adapter")):
        model = reference_model(manifest.tokenizer.vocab_size, adapter)
        nll, count, num_bytes = 0.0, 0, 0
        for doc in documents:
            text = texts[doc.doc_id]
            ids = np.array([*tokenizer.encode(text, add_special_tokens=False).ids, manifest.tokenizer.eos_id])
            assert np.array_equal(doc.input_ids, ids)  # the rejoined document is the source's tokens
            n_nll, n = strided_reference(model, ids, 64, 28)
            nll, count = nll + n_nll, count + n
            # bits per byte by hand: the text's UTF-8 bytes (NFC, as the tokenizer normalises) less
            # those of the first token, which is never a target; the EOS adds none
            first = tokenizer.decode(ids[:1].tolist())
            assert "\ufffd" not in first
            num_bytes += len(unicodedata.normalize("NFC", text).encode()) - len(first.encode())
        figures = report.results[row]["val"]
        assert figures.num_targets == count == sum(len(d.input_ids) - 1 for d in documents)
        assert figures.num_bytes == num_bytes
        assert figures.num_rows == PackedDataset(packed_sample).split("val").num_rows  # every row's documents
        close(figures.nll_sum, nll)
        close(figures.bits_per_byte, nll / math.log(2) / num_bytes)
    # packed perplexity scores fewer tokens (each fragment's first) with less context
    packed = run_eval(EvalConfig(data=cfg.data, model="tiny-qwen2", seed=SEED, device="cpu"), log=quiet)
    assert packed.results["tiny-qwen2"]["val"].num_targets < report.results["base"]["val"].num_targets


def test_bits_per_byte_of_packed_rows_count_each_targets_text(packed_sample, sample):
    """Per segment: the bytes of its decoded text less its first token's; EOS 0 bytes."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(sample[1] / "tokenizer.json"))
    report = run_eval(
        EvalConfig(data=(("val", packed_sample),), model="tiny-qwen2", max_tokens=1000, device="cpu"),
        log=quiet,
    )
    figures = report.results["tiny-qwen2"]["val"]
    split = PackedDataset(packed_sample).split("val")
    num_rows = figures.num_rows
    assert (
        sum(split.row(i).num_tokens for i in range(num_rows - 1))
        < 1000
        <= sum(split.row(i).num_tokens for i in range(num_rows))
    )
    num_bytes = 0
    for index in range(num_rows):
        row = split.row(index)
        for k in range(row.num_segments):
            ids = row.input_ids[row.cu_seqlens[k] : row.cu_seqlens[k + 1]].tolist()
            whole, first = tokenizer.decode(ids), tokenizer.decode(ids[:1])
            assert "\ufffd" not in whole + first  # no character cut at these fragments' ends
            num_bytes += len(whole.encode()) - len(first.encode())
    assert figures.num_bytes == num_bytes
    assert figures.bits_per_byte == pytest.approx(figures.nll_sum / math.log(2) / num_bytes, rel=1e-12)


def test_token_bytes_of_the_qwen_tokenizer_add_up_to_the_text(qwen_tokenizer):
    from tokenizers import Tokenizer

    file = qwen_tokenizer
    tokenizer = Tokenizer.from_file(str(file))
    lengths = token_byte_lengths(file, tokenizer.get_vocab_size(with_added_tokens=True))
    assert lengths is not None
    for text in (
        "Z\u00fcrich caf\u00e9, na\u00efve \u6771\u4eac \U0001f680 <tool_call> x",
        "  tabs\tand\nnewlines",
        "plain ascii",
    ):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert int(lengths[ids].sum()) == len(unicodedata.normalize("NFC", text).encode())
    assert lengths[tokenizer.token_to_id("<|endoftext|>")] == 0


@pytest.mark.slow
def test_every_checkpoint_of_a_run_and_the_json(packed_sample, trained, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--run", str(trained), "--data", f"val={packed_sample}", "--max-rows", "6"]
    args += ["--device", "cpu", "--attn", "sdpa", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "r1/step-00000001" in result.output and "bits/byte" in result.output
    report = json.loads(out.read_text())
    assert report["mode"] == "packed" and report["base_model"] == "tiny-qwen2"
    assert [m["name"] for m in report["models"]] == ["base", "r1/step-00000001", "r1/step-00000002"]
    assert [m["step"] for m in report["models"]] == [None, 1, 2]
    assert report["sets"][0]["split"] == "val" and report["sets"][0]["rows"] == 6
    figures = [m["results"]["val"] for m in report["models"]]
    assert all(f["ppl"] == pytest.approx(math.exp(f["loss"])) for f in figures)
    assert len({f["loss"] for f in figures}) == 3  # each checkpoint is its own model
    # the last checkpoint is the exported adapter
    adapter = run_eval(
        EvalConfig(data=(("val", packed_sample),), adapters=(trained / "adapter",), max_rows=6, base=False),
        log=quiet,
    )
    assert adapter.results[str(trained / "adapter")]["val"].nll_sum == pytest.approx(figures[2]["nll_sum"])


@pytest.mark.slow
def test_full_fine_tuning_checkpoints_equal_their_exported_model(packed_sample, tmp_path):
    """A --no-lora run's checkpoint (model.safetensors) scores as its exported `model/` folder does
    in plain transformers."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    cfg = RunConfig(
        data=packed_sample, out=out, model="tiny-qwen2", max_steps=1, batch_size=2, lr=3e-2, lora=False,
        eval_every=0, device="cpu", attn="sdpa", seed=SEED,
    )  # fmt: skip
    train(cfg, log=quiet)
    report = run_eval(EvalConfig(data=(("val", packed_sample),), runs=(out,), max_rows=4), log=quiet)
    reference = AutoModelForCausalLM.from_pretrained(out / "model", attn_implementation="eager").double()
    split = PackedDataset(packed_sample).split("val")
    nll, count = packed_reference(reference.eval(), split, 4)
    figures = report.results["full/step-00000001"]["val"]
    assert figures.num_targets == count
    close(figures.nll_sum, nll)
    assert abs(report.results["base"]["val"].nll_sum - nll) > 1.0  # negative control: the base differs


@pytest.mark.slow
def test_a_model_evaluated_alone_is_labelled_by_what_it_is(packed_sample, trained, tmp_path):
    """`--model FOLDER` alone (an exported model) is that folder's row, not `base`; NAME=FOLDER names it;
    under --adapter/--run the model is the `base` the trained rows are put on and compared with."""
    from train.model import load_base

    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    load_base("tiny-qwen2", vocab_size=vocab_size, seed=SEED).save_pretrained(tmp_path / "r1-merged")
    common = ["eval", "--data", f"val={packed_sample}", "--max-rows", "2", "--device", "cpu"]
    for model, label in (
        (str(tmp_path / "r1-merged"), "r1-merged"),
        (f"mine={tmp_path / 'r1-merged'}", "mine"),
    ):
        out = tmp_path / f"{label}.json"
        result = CliRunner().invoke(app, [*common, "--model", model, "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert f"│ {label} " in result.output and "│ base " not in result.output
        assert "┃ vs " not in result.output  # one model: no change against a base to show
        assert [(m["name"], m["base"]) for m in json.loads(out.read_text())["models"]] == [(label, True)]
    args = [*common, "--model", str(tmp_path / "r1-merged"), "--adapter", str(trained / "adapter")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "│ base " in result.output and "vs base" in result.output
    # the adapter was trained on tiny-qwen2: the note says the --model given is another base
    assert "is not the model the adapters and checkpoints were trained on (`tiny-qwen2`)" in result.output
    own_base = [*common, "--model", "tiny-qwen2", "--seed", str(SEED), "--adapter", str(trained / "adapter")]
    result = CliRunner().invoke(app, own_base)
    assert result.exit_code == 0 and "not the model" not in result.output, result.output
    result = CliRunner().invoke(app, [*args[:-4], "--model", f"fin={tmp_path / 'r1-merged'}", *args[-2:]])
    assert result.exit_code == 0, result.output
    assert "│ fin " in result.output and "vs fin" in result.output
    report = run_eval(EvalConfig(data=(("val", packed_sample),), model="tiny-qwen2", max_rows=1), log=quiet)
    assert [row.name for row in report.rows] == ["tiny-qwen2"]


@pytest.mark.slow
def test_run_evaluates_every_named_set_at_step_0_and_after(packed_sample, packed_64, trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_set"]) for r in records if "eval_loss" in r]
    assert evals == [(0, "val"), (0, "other"), (2, "val"), (2, "other")]
    # step 0 is the base model, step 2 the last checkpoint: what `train eval` computes for them
    report = run_eval(
        EvalConfig(data=(("val", packed_sample), ("other", packed_64)), runs=(trained,), device="cpu"),
        log=quiet,
    )
    for step, row in ((0, "base"), (2, "r1/step-00000002")):
        for name in ("val", "other"):
            record = next(r for r in records if r.get("eval_set") == name and r["step"] == step)
            assert record["eval_loss"] == pytest.approx(report.results[row][name].loss, rel=1e-6)
            assert record["eval_ppl"] == pytest.approx(math.exp(record["eval_loss"]))
            assert record["eval_target_tokens"] == report.results[row][name].num_targets


@pytest.mark.slow
def test_run_logs_perplexity_and_reads_eval_sets_from_flags_and_toml(packed_sample, packed_64, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'eval-data = ["other={packed_64}"]\n')
    assert load_toml(toml)["eval_data"] == (("other", packed_64),)
    flags = {"data": packed_sample, "model": "tiny-qwen2", "out": tmp_path / "r", "max_steps": 1}
    cfg = build_run_config(toml, {**flags, "eval_data": [f"news={packed_64}", str(packed_sample)]})
    assert cfg.eval_data == (("news", packed_64), ("val", packed_sample))  # flags win; a bare path is `val`
    lines: list[str] = []
    args = {"batch_size": 2, "eval_every": 1, "device": "cpu", "attn": "sdpa", "lora_r": 4, "lora_alpha": 8}
    train(RunConfig(**{**flags, **args, "eval_data": (("other", packed_64),)}), log=lines.append)
    evals = [line for line in lines if line.startswith("eval step")]
    assert [line.split(" | ")[1] for line in evals] == ["val", "other", "val", "other"]
    assert all(" | ppl " in line for line in evals)


def test_bad_eval_options_name_the_fix(packed_sample, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("eval-data = 3\n")
    with pytest.raises(ConfigError, match="eval-data"):
        load_toml(toml)
    with pytest.raises(ConfigError, match="given twice"):
        build_run_config(
            None, {"data": packed_sample, "model": "m", "out": tmp_path, "eval_data": ["a=x", "a=y"]}
        )
    with pytest.raises(EvalError, match="--stride"):
        rolling_windows(100, window=10, stride=10)
    with pytest.raises(EvalError, match="--doc-level"):
        EvalConfig(data=(("val", packed_sample),), model="tiny-qwen2", stride=4)
    result = CliRunner().invoke(app, ["eval", "--data", f"val={packed_sample}", "--adapter", str(tmp_path)])
    assert result.exit_code == 1 and "neither a peft adapter folder" in result.output


def test_rolling_windows_score_every_token_once():
    for n, window, stride in ((1, 4, 2), (5, 8, 3), (100, 16, 5), (17, 16, 15)):
        scored = []
        for begin, end, first in rolling_windows(n, window=window, stride=stride):
            assert end - begin <= window and begin < max(first, 1) <= end
            assert first - begin >= min(window - stride, first)  # context before the scored tokens
            scored += range(max(first, 1), end)
        assert scored == list(range(1, n))


def test_read_documents_caps_take_whole_documents(packed_sample):
    split = PackedDataset(packed_sample).split("val")
    everything, rows = read_documents(split)
    assert rows == split.num_rows
    first, _ = read_documents(split, max_rows=1)
    assert [d.doc_id for d in first] == [int(x) for x in split.row(0).doc_ids]
    long = next(d for d in everything if d.doc_id == first[0].doc_id)
    assert np.array_equal(first[0].input_ids, long.input_ids) and first[0].num_fragments > 1


@pytest.mark.slow
def test_eval_of_a_run_without_data_takes_the_runs_eval_sets(packed_sample, packed_64, trained, tmp_path):
    """`train eval --run RUN` alone scores the sets the run evaluated (its --data's val, its --eval-data)."""
    out = tmp_path / "eval.json"
    adapter = str(trained / "adapter")  # a long name: the table widens, it does not wrap it
    args = ["eval", "--run", str(trained), "--adapter", adapter, "--no-base", "--max-rows", "2"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert len(adapter) > 40 and f"│ {adapter} │" in result.output  # 80 columns would wrap it
    assert "┃ target tokens ┃" in result.output
    assert [line for line in result.output.splitlines() if line != line.rstrip()] == []  # nothing padded
    assert f"eval sets of the run: val={packed_sample}, other={packed_64}" in result.output
    report = json.loads(out.read_text())
    assert [(s["name"], s["path"]) for s in report["sets"]] == [
        ("val", str(packed_sample)),
        ("other", str(packed_64)),
    ]
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert {r["eval_set"] for r in records if "eval_loss" in r} == {"val", "other"}


def test_eval_of_a_run_whose_sets_are_not_found_says_to_give_them(packed_sample, packed_64):
    def sets(**config):
        return run_eval_sets([ModelRow("r", config={"data": str(packed_sample), **config})])

    assert sets(eval_data=[f"o={packed_64}"]) == (("val", packed_sample), ("o", packed_64))
    assert sets(eval_data=[str(packed_64)]) == (("val", packed_64),)  # a bare path replaces `val`
    with pytest.raises(EvalError, match=r"eval set o=`not/here` is not there.*--data o=PATH"):
        sets(eval_data=["o=not/here"])
    with pytest.raises(EvalError, match=r"eval set val=`moved` is not there.*--data val=PATH"):
        run_eval_sets([ModelRow("r", config={"data": "moved"})])  # not a run without a `val` split
    with pytest.raises(EvalError, match=r"no `val` split.*--data NAME=PATH"):
        run_eval_sets([ModelRow("r", config={"data": str(packed_64), "eval_data": []})])
    with pytest.raises(EvalError, match="the runs used different eval sets"):
        run_eval_sets(
            [ModelRow("a", config={"data": str(packed_sample)}), ModelRow("b", config={"data": "x"})]
        )


@pytest.mark.slow
def test_run_eval_max_tokens_scores_the_leading_rows_and_train_eval_follows(
    packed_sample, packed_64, tmp_path
):
    """--eval-max-tokens caps every eval of the run to the same leading rows; `train eval --run` alone
    scores those rows too, so its base and last rows equal the run's step-0 and last evals."""
    out = tmp_path / "capped"
    cfg = RunConfig(
        data=packed_sample, out=out, model="tiny-qwen2", max_steps=1, batch_size=2, lr=3e-2, eval_every=1,
        eval_max_tokens=100, eval_data=(("other", packed_64),), device="cpu", attn="sdpa", lora_r=4,
        lora_alpha=8, seed=SEED,
    )  # fmt: skip
    lines: list[str] = []
    train(cfg, log=lines.append)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {(r["step"], r["eval_set"]): r for r in records if "eval_loss" in r}
    full = PackedDataset(packed_64).split("train")
    assert evals[0, "other"]["eval_target_tokens"] < int(full.row_lengths().sum()) - full.num_rows
    assert "| 2 rows," in next(
        line for line in lines if line.startswith("eval step 0 | other")
    )  # 64-token rows
    report = run_eval(EvalConfig(runs=(out,), device="cpu", attn="sdpa"), log=lines.append)
    assert "and their leading rows up to 100 tokens, as the run's --eval-max-tokens" in lines
    for step, row in ((0, "base"), (1, "capped/step-00000001")):
        for name in ("val", "other"):
            figures = report.results[row][name]
            assert figures.num_targets == evals[step, name]["eval_target_tokens"]
            assert figures.loss == pytest.approx(evals[step, name]["eval_loss"], rel=1e-6)
    with pytest.raises(ConfigError, match="--eval-max-tokens"):
        RunConfig(data=packed_sample, out=out, model="tiny-qwen2", max_steps=1, eval_max_tokens=0)
