"""`train export` and generation: a merged export is the adapter on its base, an adapter export loads from
anywhere, and a project-loaded model generates what plain transformers generates."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from shared.reader import PackedDataset
from train.cli import app
from train.config import RunConfig
from train.loop import train
from train.model import LoraSettings, load_base, load_model

from .tiny import working_directory

runner = CliRunner()
PROMPT = "The company said"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def trained(packed_sample, tmp_path_factory) -> Path:
    """A folder holding `base/` (tiny-qwen2 saved as a model folder) and `runs/r1`, a LoRA run of 4 steps
    on it, started with the relative `--model base` as a user would; checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("export")
    vocab_size = PackedDataset(packed_sample).manifest.tokenizer.vocab_size
    base = load_base("tiny-qwen2", vocab_size=vocab_size, seed=0)
    base.config.use_cache = True
    base.save_pretrained(root / "base")
    with working_directory(root):
        cfg = RunConfig(
            data=packed_sample,
            model="base",
            out=Path("runs/r1"),
            max_steps=4,
            save_every=2,
            batch_size=2,
            lr=1e-2,
            eval_every=0,
            device="cpu",
            attn="sdpa",
            lora_r=8,
            lora_alpha=16,
        )
        train(cfg, log=lambda _: None)
    return root


def export(root: Path, *args: str):
    with working_directory(root), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's call of a deprecated transformers property
        return runner.invoke(app, ["export", *args])


@pytest.fixture(scope="module")
def eos(packed_sample) -> int:
    return PackedDataset(packed_sample).manifest.tokenizer.eos_id


def greedy(
    model, input_ids: torch.Tensor, eos: int, max_new_tokens: int = NEW_TOKENS, **options
) -> torch.Tensor:
    """The new tokens of greedy decoding, stopping at ``eos`` whatever the model's generation config says
    (a merged export names the dataset's EOS; the base folder names none)."""
    out = model.generate(
        input_ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        **options,
    )
    return out[0, input_ids.shape[1] :]


def test_merged_export_equals_the_adapter_on_its_base(eos, trained):
    result = export(trained, "runs/r1", "--merge", "--out", "merged")
    assert result.exit_code == 0, result.output
    assert "exported the merged model of runs/r1/checkpoints/step-00000004" in result.output
    merged_dir = trained / "merged"
    config = (merged_dir / "config.json").read_text()
    assert "packed_varlen" not in config and "attn_implementation" not in config
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.config._attn_implementation in ("sdpa", "eager")
    assert merged.generation_config.eos_token_id == eos  # the base named none: the dataset's
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained / "base"), trained / "runs/r1/adapter"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(greedy(merged, input_ids, eos), greedy(adapter, input_ids, eos))
    with torch.no_grad():
        merged_logits = merged.double()(input_ids).logits
        adapter_logits = adapter.double()(input_ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(trained / "base").double()(input_ids).logits
    # The merged weights are stored in float32 (W + BA rounded once each); in float64 everything else is
    # exact to ~1e-15, so the logits agree to float32 round-off of the weights.
    scale = adapter_logits.abs().max().item()
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5 * scale, rtol=0)
    # negative control: the adapter was trained (not its zero init), so the base alone differs
    assert (base_logits - adapter_logits).abs().max() > 1e-2 * scale


def test_adapter_export_loads_from_another_working_directory(eos, trained, tmp_path):
    result = export(trained, "runs/r1", "--out", "adapter")
    assert result.exit_code == 0, result.output
    adapter_dir = trained / "adapter"
    for folder in (
        adapter_dir,
        trained / "runs/r1/adapter",
        trained / "runs/r1/checkpoints/step-00000002/adapter",
    ):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((trained / "base").resolve())
        assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    with working_directory(tmp_path):  # base_model_name_or_path resolves without the run's folder
        loaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained / "base"), trained / "runs/r1/adapter"
    ).eval()
    assert torch.equal(greedy(loaded, input_ids, eos), greedy(reference, input_ids, eos))


def test_export_and_eval_print_no_progress_bars_and_leave_them_on(trained, packed_sample):
    """transformers' `Loading weights` and `Writing model shards` bars are off while our commands run
    (their own lines say what was loaded and written), and on again after them."""
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    noise = ("Loading weights", "Writing model shards", "it/s]")
    result = export(trained, "runs/r1", "--merge", "--out", "quiet")
    assert result.exit_code == 0, result.output
    assert "exported the merged model" in result.output
    assert not [n for n in noise if n in result.output], result.output
    args = ["eval", "--model", str(trained / "quiet"), "--data", f"val={packed_sample}", "--max-rows", "1"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "│ quiet " in result.output and not [n for n in noise if n in result.output], result.output
    assert hf_logging.is_progress_bar_enabled()  # for whoever imports the library next


def test_export_picks_a_checkpoint(trained):
    result = export(trained, "runs/r1", "--checkpoint", "2", "--out", "step2")
    assert result.exit_code == 0, result.output
    step2 = load_file(trained / "step2/adapter_model.safetensors")
    step4 = load_file(trained / "runs/r1/adapter/adapter_model.safetensors")
    assert step2.keys() == step4.keys()
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)
    # every exported file is readable as the umask says (safetensors alone writes 0600)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (trained / "step2").iterdir()}
    assert modes["adapter_model.safetensors"] == 0o666 & ~umask, modes
    assert set(modes.values()) == {0o666 & ~umask}, modes
    run_adapter = (trained / "runs/r1/adapter/adapter_model.safetensors").stat().st_mode & 0o777
    assert run_adapter == 0o666 & ~umask  # the run's own adapter/ too
    result = export(trained, "runs/r1", "--checkpoint", "3", "--out", "step3")
    assert result.exit_code == 1 and "has steps 2, 4" in result.output
    assert not (trained / "step3").exists()


def test_export_refuses_to_overwrite_unless_asked(trained):
    out = trained / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = export(trained, "runs/r1", "--merge", "--out", "occupied")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = export(trained, "runs/r1", "--merge", "--out", "runs")  # would replace the run itself
    assert result.exit_code == 1 and "which the export reads" in result.output
    result = export(trained, "runs/r1", "--merge", "--out", "occupied", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p.name for p in trained.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_without_the_base_says_how_to_find_it(trained, tmp_path):
    """Exported from elsewhere, the run's relative --model is not found; the adapter's absolute path is."""
    with working_directory(tmp_path):
        result = runner.invoke(app, ["export", str(trained / "runs/r1"), "--merge", "--out", "m"])
    assert result.exit_code == 0, result.output
    assert f"base       {(trained / 'base').resolve()}" in result.output
    result = export(trained, "runs/r1", "--merge", "--out", "m2", "--base", "nowhere")
    assert result.exit_code == 1 and "--base PATH" in result.output


@pytest.mark.slow
def test_tiny_qwen2_run_exports_merged_only(eos, packed_sample, tmp_path):
    cfg = RunConfig(
        data=packed_sample,
        model="tiny-qwen2",
        out=tmp_path / "run",
        max_steps=2,
        batch_size=2,
        lr=1e-2,
        eval_every=0,
        device="cpu",
        attn="sdpa",
        lora_r=4,
        lora_alpha=8,
    )
    train(cfg, log=lambda _: None)
    result = export(tmp_path, "run", "--out", "adapter")
    assert result.exit_code == 1 and "--merge" in result.output
    result = export(tmp_path, "run", "--merge", "--out", "merged")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    project = load_model(
        "tiny-qwen2", vocab_size=merged.config.vocab_size, attn="sdpa", lora=LoraSettings(r=4, alpha=8)
    )
    set_peft_model_state_dict(project, load_file(tmp_path / "run/adapter/adapter_model.safetensors"))
    input_ids = AutoTokenizer.from_pretrained(tmp_path / "merged")(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(greedy(merged.eval(), input_ids, eos), greedy(project.eval(), input_ids, eos))


@pytest.mark.slow
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_on_a_project_loaded_model_equals_plain_transformers(eos, trained, use_cache):
    """The project's attention (no boundaries: one sequence) generates what transformers' own does, for the
    model alone and with the run's adapter loaded the project's way."""
    base = trained / "base"
    project = load_model(str(base), vocab_size=None, attn="sdpa", dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained / "runs/r1/adapter")
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    for implementation in ("sdpa", "eager"):
        plain = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float64, attn_implementation=implementation
        )
        assert torch.equal(
            greedy(project, input_ids, eos, use_cache=use_cache), greedy(plain.eval(), input_ids, eos)
        )
    lora = load_model(str(base), vocab_size=None, attn="sdpa", lora=LoraSettings(r=8, alpha=16)).eval()
    set_peft_model_state_dict(lora, load_file(trained / "runs/r1/adapter/adapter_model.safetensors"))
    plain_lora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), trained / "runs/r1/adapter"
    )
    attention_mask = torch.ones_like(input_ids)  # what a tokenizer returns for one prompt: allowed
    got = lora.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=use_cache,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    assert torch.equal(got[0, input_ids.shape[1] :], greedy(plain_lora.eval(), input_ids, eos))


@pytest.mark.slow
def test_sample_generations_at_each_eval_are_the_model_s_greedy_continuations(
    trained, packed_sample, tmp_path
):
    from tokenizers import Tokenizer

    from train.outputs import read_metrics

    out = tmp_path / "run"
    cfg = RunConfig(
        data=packed_sample,
        model=str(trained / "base"),
        out=out,
        max_steps=2,
        batch_size=2,
        lr=1e-2,
        eval_every=1,
        device="cpu",
        attn="sdpa",
        lora_r=4,
        lora_alpha=8,
        sample_prompt=[PROMPT, "Shares"],  # a TOML list becomes a tuple
        sample_tokens=6,
    )
    lines: list[str] = []
    train(cfg, log=lines.append)
    records = [r for r in read_metrics(out / "metrics.jsonl") if "samples" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert [s["prompt"] for s in records[-1]["samples"]] == [PROMPT, "Shares"]
    assert any(line.startswith(f"sample step 2 | {PROMPT!r} -> ") for line in lines)
    # the same continuation from plain transformers and peft, with the run's final adapter
    info = PackedDataset(packed_sample).manifest.tokenizer
    tokenizer = Tokenizer.from_file(str(out / "adapter" / "tokenizer.json"))
    ids = ([] if info.bos_id is None else [info.bos_id]) + tokenizer.encode(
        PROMPT, add_special_tokens=False
    ).ids
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained / "base"), out / "adapter"
    ).eval()
    expected = greedy(plain, torch.tensor([ids]), info.eos_id, 6)
    first = records[-1]["samples"][0]
    assert first["num_tokens"] == len(expected) and 0 < len(expected) <= 6
    assert first["completion"] == tokenizer.decode(expected.tolist(), skip_special_tokens=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sample_prompt": [""]}, "non-empty texts"),
        ({"sample_prompt": "one string"}, "non-empty texts"),
        ({"sample_prompt": ["x"], "sample_tokens": 0}, "--sample-tokens 0"),
        ({"sample_prompt": ["x"], "fsdp": True, "lora": False}, "--fsdp"),
    ],
)
def test_bad_sample_options_name_the_flag(packed_sample, tmp_path, options, message):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        RunConfig(data=packed_sample, model="tiny-qwen2", out=tmp_path, max_steps=1, **options)


@pytest.mark.slow
def test_full_fine_tuning_run_exports_its_model(trained, packed_sample, tmp_path):
    cfg = RunConfig(
        data=packed_sample,
        model=str(trained / "base"),
        out=tmp_path / "run",
        max_steps=2,
        batch_size=2,
        lr=1e-2,
        eval_every=0,
        device="cpu",
        attn="sdpa",
        lora=False,
    )
    train(cfg, log=lambda _: None)
    result = export(tmp_path, "run", "--out", "model")
    assert result.exit_code == 0, result.output
    assert "exported the model of" in result.output
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")  # the run's own export
    base = AutoModelForCausalLM.from_pretrained(trained / "base")
    names = dict(exported.named_parameters())
    assert all(torch.equal(names[n], p) for n, p in final.named_parameters())
    assert any(not torch.equal(names[n], p) for n, p in base.named_parameters())  # trained
    assert (tmp_path / "model" / "tokenizer.json").is_file()
