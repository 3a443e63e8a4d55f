"""`train run --compile`: each decoder layer compiled by `train.model.compile_layers` computes what the
eager layer computes, with LoRA, with gradient checkpointing, through resume and export; where it
cannot run it is refused with the fix, never silently skipped.

Compiling is slow on a shared 2-core box (tens of seconds cold, with inductor's on-disk cache about
15 s), so the compiling tests are few and marked slow.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from typer.testing import CliRunner

from train.attention import IMPLEMENTATION_NAMES
from train.cli import app
from train.config import ConfigError, RunConfig, build_run_config
from train.loss import micro_batch_loss_sum
from train.model import (
    ModelError,
    causal_lm,
    compile_layers,
    compile_problem,
    enable_grad_checkpointing,
    forward_hidden,
    layers_compiled,
)

from .segments import make_batch
from .tiny import tiny_lora

runner = CliRunner()
VOCAB = 300
# Float64 weights, but Qwen2's RMSNorm computes in float32 inside each layer, and inductor reduces in
# another order than eager: measured differences reach 3e-6 of a gradient's largest value. A leak
# across one boundary moves them by far more (the negative control below).
TOLERANCE = 3e-5
needs_inductor = pytest.mark.skipif(
    compile_problem("cpu") is not None, reason=str(compile_problem("cpu"))
)  # a machine without a C++ compiler: what the refusal test covers


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = micro_batch_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_close(got, want) -> None:
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=TOLERANCE, atol=0.0)
    assert grads.keys() == want_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    for name, want in want_grads.items():
        assert want.abs().max() > 0, name  # every adapter weight has a gradient to compare
        scale = TOLERANCE * want.abs().max().item()
        torch.testing.assert_close(grads[name], want, rtol=0.0, atol=scale, msg=name)


@pytest.mark.slow
@needs_inductor
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_compiled_layers_give_the_eager_loss_and_lora_gradients(grad_checkpointing):
    batches = [make_batch([9, 14, 6, 11], VOCAB, seed=2), make_batch([5, 20, 7], VOCAB, seed=3)]
    eager = tiny_lora(VOCAB, dtype=torch.float64)
    want = [_loss_and_grads(eager, b) for b in batches]

    model = tiny_lora(VOCAB, dtype=torch.float64, grad_checkpointing=grad_checkpointing)
    torch._dynamo.reset()  # compiled afresh (from inductor's disk cache if there), so that it counts
    counters.clear()
    assert compile_layers(model) == 2 and layers_compiled(model)
    got = [_loss_and_grads(model, batches[0])]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # inductor compiled them: no silent eager fallback
    got.append(_loss_and_grads(model, batches[1]))
    assert counters["stats"]["unique_graphs"] == graphs  # dynamic shapes: another token count, no recompile
    for g, w in zip(got, want, strict=True):
        _assert_close(g, w)
    # the parameter names (checkpoints, adapters) are the eager model's
    assert list(model.state_dict()) == list(eager.state_dict())
    with pytest.raises(ModelError, match="compiled already"):
        compile_layers(model)
    with pytest.raises(ModelError, match="before `compile_layers`"):
        enable_grad_checkpointing(model)

    # NEGATIVE CONTROL: two documents merged into one (a leak across one boundary) is far outside it
    leaky = dataclasses.replace(batches[0], cu_seqlens=batches[0].cu_seqlens[[0, 1, 3, 4]], max_seqlen=20)
    with pytest.raises(AssertionError):
        _assert_close(_loss_and_grads(eager, leaky), want[0])


@pytest.mark.slow
def test_the_gpu_varlen_path_compiles_to_one_graph_per_layer_and_checkpoints_outside_it():
    """On meta tensors (no GPU here): with `torch_varlen` attention, a custom op, each layer traces to
    one graph without a break, a new token count does not recompile, and with checkpointing only each
    layer's input is saved for the backward (the compiled layer is recomputed, not kept)."""
    saved_bytes = {}
    for ckpt in (False, True):
        graphs = []

        def capture(gm, example_inputs, graphs=graphs):
            graphs.append(gm)
            return gm.forward

        model = tiny_lora(VOCAB, dtype=torch.bfloat16, grad_checkpointing=ckpt)
        causal_lm(model).set_attn_implementation(IMPLEMENTATION_NAMES["torch_varlen"])
        model.to("meta")
        counters.clear()
        compile_layers(model, backend=capture)
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        for lengths in ([9, 14, 6, 11], [5, 20]):
            batch = make_batch(lengths, VOCAB).to("meta")
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                hidden = forward_hidden(model, batch)
            hidden.float().sum().backward()
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert 1 <= len(graphs) <= 2, len(graphs)  # the first layer's input needs no gradient, the others' do
        for gm in graphs:
            assert any("varlen_attn" in str(node.target) for node in gm.graph.nodes)
        saved_bytes[ckpt] = sum(sizes)
    assert saved_bytes[True] * 4 < saved_bytes[False], saved_bytes


def test_compile_is_refused_with_the_fix_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    problem = compile_problem("cpu")
    assert problem.startswith("--compile needs a C++ compiler on the CPU")
    assert "`no-such-compiler-here` is not on PATH" in problem
    model = tiny_lora(VOCAB)
    with pytest.raises(ModelError, match="--compile needs a C\\+\\+ compiler"):
        compile_layers(model)
    assert not layers_compiled(model)
    assert compile_problem("cpu", backend="aot_eager") is None  # generates no code: needs no compiler

    import train.model as model_module

    monkeypatch.setattr(model_module, "resolve_device", torch.device)
    real_find_spec = model_module.importlib.util.find_spec
    monkeypatch.setattr(
        model_module.importlib.util,
        "find_spec",
        lambda name: None if name == "triton" else real_find_spec(name),
    )
    assert compile_problem("cuda").startswith("--compile needs Triton on a CUDA GPU")
    assert "it is not tried on mps" in compile_problem("mps")


def test_compile_is_an_option_like_the_others(packed_sample, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "d"\nmodel = "tiny-qwen2"\nout = "o"\nmax-steps = 3\ncompile = true\n')
    assert build_run_config(toml, {}).compile is True
    assert build_run_config(toml, {"compile": False}).compile is False  # a flag overrides the file
    toml.write_text('data = "d"\nmodel = "tiny-qwen2"\nout = "o"\nmax-steps = 3\ncompile = "yes"\n')
    with pytest.raises(ConfigError, match="`compile` must be true or false"):
        build_run_config(toml, {})
    with pytest.raises(ConfigError, match="--compile with --fsdp"):
        RunConfig(data=Path("d"), model="m", out=Path("o"), max_steps=1, lora=False, fsdp=True, compile=True)
    # refused with the fix, before any step, when inductor has no compiler
    args = ["run", "--data", str(packed_sample), "--model", "tiny-qwen2", "--out", str(tmp_path / "r")]
    args += ["--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--attn", "sdpa", "--compile"]
    result = runner.invoke(app, args, env={"CXX": "no-such-compiler-here"})
    assert result.exit_code == 1, result.output
    assert "--compile needs a C++ compiler on the CPU" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_compiled_run_logs_the_eager_losses_resumes_and_exports(packed_sample, tmp_path, monkeypatch):
    """`train run --compile --grad-checkpointing` through the CLI: the eager run's losses; its checkpoint
    resumes compiled and eager alike; `train export` writes the adapter an eager run writes.

    The layers are compiled with `aot_eager` here: the same dynamo graphs, autograd and in-place forward
    as inductor, without the minutes of C++ compilation a cold cache costs on 2 cores. That inductor's
    code computes the eager values is the float64 test's proof above."""
    import train.model as model_module
    from train.loop import train

    compile_for_tests = functools.partial(model_module.compile_layers, backend="aot_eager")
    monkeypatch.setattr(model_module, "compile_layers", compile_for_tests)

    def cfg(name: str, **kw) -> RunConfig:
        base = {"model": "tiny-qwen2", "batch_size": 2, "lr": 1e-2, "eval_every": 0, "device": "cpu"}
        base |= {"attn": "sdpa", "lora_r": 8, "lora_alpha": 16, "max_steps": 3, "save_every": 2}
        return RunConfig(data=packed_sample, out=tmp_path / name, **{**base, **kw})

    eager = train(cfg("eager"), log=lambda _: None).losses
    args = ["run", "--data", str(packed_sample), "--model", "tiny-qwen2", "--out", str(tmp_path / "compiled")]
    args += [
        "--max-steps",
        "3",
        "--save-every",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--eval-every",
        "0",
    ]
    args += ["--device", "cpu", "--attn", "sdpa", "--lora-r", "8", "--lora-alpha", "16"]
    result = runner.invoke(app, [*args, "--compile", "--grad-checkpointing"])
    assert result.exit_code == 0, result.output
    assert "grad checkpointing on | compile on (inductor, each decoder layer)" in result.output
    run_json = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert run_json["starts"][0]["compiled"] is True
    records = [
        json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()
    ]
    compiled = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert compiled.keys() == eager.keys() == {1, 2, 3}
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-5, abs=0.0), step
    assert eager[3] != pytest.approx(eager[1], rel=1e-3)  # the steps trained: later losses differ

    # resume from the compiled run's step-2 checkpoint, eager and compiled: the same step 3
    for name, flags in (("resumed-eager", {}), ("resumed-compiled", {"compile": True})):
        out = tmp_path / name
        shutil.copytree(tmp_path / "compiled", out)
        shutil.rmtree(out / "checkpoints" / "step-00000003")
        shutil.rmtree(out / "adapter")
        resumed = train(cfg(name, resume=True, **flags), log=lambda _: None).losses
        assert resumed.keys() == {3}
        assert resumed[3] == pytest.approx(compiled[3], rel=1e-5, abs=0.0), name

    # `train export` of the compiled run writes the eager run's model, key for key
    for name in ("eager", "compiled"):
        export = ["export", str(tmp_path / name), "--merge", "--out", str(tmp_path / f"{name}-export")]
        result = runner.invoke(app, export)
        assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    a = load_file(tmp_path / "eager-export" / "model.safetensors")
    b = load_file(tmp_path / "compiled-export" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
