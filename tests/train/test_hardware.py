"""The hardware a researcher owns: gradient checkpointing that changes nothing but memory, `--dtype`,
device selection (CUDA, Apple MPS, CPU; mocked here, since this machine has neither GPU), and the
memory estimate of `train plan --model`."""

from __future__ import annotations

import contextlib
import weakref
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train.hardware import DeviceError, auto_device, compute_dtype, resolve_device
from train.loss import micro_batch_loss_sum
from train.model import LoraSettings, causal_lm, load_model

from .segments import make_batch
from .tiny import tiny_lora

VOCAB = 300
TOLERANCE = 1e-12  # float64: the recomputed forward is the same arithmetic in the same order


def _loss_and_grads(grad_checkpointing: bool, calls: list[int]):
    model = tiny_lora(VOCAB, dtype=torch.float64, grad_checkpointing=grad_checkpointing)
    # A pre-hook: the recompute stops as soon as it has what the backward needs, before the MLP returns.
    mlp = causal_lm(model).model.layers[0].mlp
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = make_batch([9, 14, 6, 11], VOCAB, seed=2)
    loss = micro_batch_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_grad_checkpointing_gives_the_same_loss_and_gradients_in_float64():
    plain_calls, ckpt_calls = [], []
    loss, grads = _loss_and_grads(False, plain_calls)
    loss_gc, grads_gc = _loss_and_grads(True, ckpt_calls)
    # it really recomputed: the layer ran again in the backward (the control that it was on at all)
    assert (len(plain_calls), len(ckpt_calls)) == (1, 2)
    torch.testing.assert_close(loss_gc, loss, rtol=TOLERANCE, atol=0.0)
    assert grads.keys() == grads_gc.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    for name, want in grads.items():
        assert want.abs().max() > 0, name  # every adapter weight has a gradient to compare
        scale = TOLERANCE * want.abs().max().item()
        torch.testing.assert_close(grads_gc[name], want, rtol=TOLERANCE, atol=scale, msg=name)


# -- devices -----------------------------------------------------------------------------------------


def _machine(*, cuda=False, mps=False, mps_built=False, gpu_problem=None):
    """Patches for a machine with the given accelerators (and an unusable GPU's description)."""
    return [
        mock.patch("torch.cuda.is_available", return_value=cuda),
        mock.patch("torch.backends.mps.is_available", return_value=mps),
        mock.patch("torch.backends.mps.is_built", return_value=mps_built),
        mock.patch("train.hardware.unusable_gpu", return_value=gpu_problem),
    ]


def _on(patches):
    for p in patches:
        p.start()
    return patches


@pytest.fixture
def machine():
    started = []

    def use(**kw):
        started.extend(_on(_machine(**kw)))

    yield use
    for p in started:
        p.stop()


def test_auto_picks_mps_on_a_mac_and_cpu_without_a_gpu(machine):
    machine(mps=True, mps_built=True)
    assert resolve_device("auto") == torch.device("mps")
    assert auto_device()[1] == "auto: Apple MPS"


def test_auto_is_cpu_only_where_there_is_no_gpu(machine):
    machine()
    assert auto_device() == (torch.device("cpu"), "auto: no CUDA or MPS device")


def test_auto_refuses_to_train_a_gpu_machine_on_the_cpu(machine):
    machine(gpu_problem="it has an NVIDIA GPU (/dev/nvidiactl) but torch 2.13.0+cpu is a CPU-only build")
    with pytest.raises(DeviceError, match="found a GPU that torch cannot use: it has an NVIDIA GPU") as e:
        resolve_device("auto")
    assert "pass --device cpu to train on the CPU on purpose" in str(e.value)
    assert resolve_device("cpu") == torch.device("cpu")  # asked for by name: allowed


def test_mps_asked_for_where_there_is_none_says_why(machine):
    machine(mps=False, mps_built=False)
    with pytest.raises(DeviceError, match="built without MPS"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")


def test_unusable_gpu_names_a_cpu_build_on_an_nvidia_machine():
    from train import hardware as model_module

    real_exists = model_module.Path.exists
    with (
        mock.patch.object(
            model_module.Path, "exists", lambda p: str(p) == "/dev/nvidiactl" or real_exists(p)
        ),
        mock.patch("torch.cuda.is_available", return_value=False),
        mock.patch("torch.version.cuda", None),
    ):
        assert "CPU-only build" in model_module.unusable_gpu()
    with (
        mock.patch.object(model_module.Path, "exists", lambda p: False),
        mock.patch("shutil.which", return_value=None),
    ):
        assert model_module.unusable_gpu() is None or "Mac" in model_module.unusable_gpu()


def test_mps_runs_the_per_segment_reference_attention():
    from train.attention import AttentionSetupError, resolve_attn

    assert resolve_attn("auto", "mps") == "sdpa"
    with pytest.raises(AttentionSetupError, match="needs a CUDA device"):
        resolve_attn("torch_varlen", "mps")


def test_loss_sums_avoid_float64_on_mps_only():
    from train.hardware import sum_dtype

    # MPS has no float64: the loop's loss sums and token counts accumulate in float32 there
    assert sum_dtype(torch.device("mps")) == torch.float32
    assert sum_dtype(torch.device("cpu")) == sum_dtype(torch.device("cuda")) == torch.float64


# -- dtype -------------------------------------------------------------------------------------------


def test_dtype_auto_is_fp32_on_cpu_and_mps_and_bf16_on_a_bf16_gpu():
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("auto", torch.device("mps")) == torch.float32
    with mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        assert compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        assert compute_dtype("auto", torch.device("cuda")) == torch.float32
        with (
            mock.patch("torch.cuda.get_device_name", return_value="Tesla V100"),
            pytest.raises(DeviceError, match="Tesla V100 has no bf16 support"),
        ):
            compute_dtype("bf16", torch.device("cuda"))
    with pytest.raises(DeviceError, match="GradScaler"):
        compute_dtype("fp16", torch.device("cpu"))


def test_bf16_on_cpu_autocasts_the_forward_and_keeps_lora_master_weights_fp32():
    model = load_model(
        "tiny-qwen2", vocab_size=VOCAB, attn="sdpa", lora=LoraSettings(r=4, alpha=8), precision="bf16"
    )
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert (trainable, frozen) == ({torch.float32}, {torch.bfloat16})
    batch = make_batch([9, 14], VOCAB)
    seen = []
    causal_lm(model).model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss = micro_batch_loss_sum(model, batch)
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)


# -- memory estimate (`train plan --model`) -----------------------------------------------------------


def test_the_parameter_counts_equal_the_real_models():
    from train.memory import model_shape

    shape = model_shape("tiny-qwen2", vocab_size=VOCAB)
    full = load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa")
    assert shape.num_params == sum(p.numel() for p in full.parameters())
    lora = load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", lora=LoraSettings(r=8, alpha=16))
    assert shape.num_lora_params(8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_the_estimate_equals_a_hand_computation():
    from train.memory import estimate_memory, model_shape

    shape = model_shape("tiny-qwen2", vocab_size=VOCAB)
    # tiny-qwen2: D 64, I 128, 4 heads of 16 (Q 64), 2 kv heads (K 32), 2 layers; LoRA r 8; bf16 (b = 2)
    per_layer = 2 * (4 * 64 + 2 * 64 + 2 * 32 + 4 * 128 + 7 * 8) + 8 * 64 + 8 + 4 * 4
    assert per_layer == 2568
    extra = 4 * 64 + 4 + 2 * 64 + 2 * 2 * 16
    lora_params = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 128))
    tokens = 256
    est = estimate_memory(shape, tokens=tokens, lora_r=8, precision="bf16")
    assert est.num_trainable == lora_params == 16_384
    assert est.weights == shape.num_params * 2 + lora_params * 4
    assert est.train_state == lora_params * (4 + 8)
    assert est.activations == tokens * (2 * per_layer + extra)
    assert est.loss_chunk == tokens * VOCAB * (4 + 2)  # 256 tokens: less than one 1024-token chunk
    ckpt = estimate_memory(shape, tokens=tokens, lora_r=8, precision="bf16", grad_checkpointing=True)
    assert ckpt.activations == tokens * (2 * 2 * 64 + extra + per_layer)
    full = estimate_memory(shape, tokens=tokens, lora_r=None, precision="fp32")
    assert (full.weights, full.train_state) == (shape.num_params * 4, shape.num_params * 12)
    assert full.loss_chunk == tokens * VOCAB * 4  # fp32: the fused loss's casts are no-ops


def test_checkpointing_keeps_only_each_layers_input():
    """The saved-tensor bytes of a checkpointed forward are the estimate's kept part, exactly: each
    layer's input (b x D per token) and the final norm's fp32 input and 1/rms (4D + 4)."""
    from train.model import forward_hidden

    for precision, b in (("fp32", 4), ("bf16", 2)):
        model = load_model(
            "tiny-qwen2", vocab_size=VOCAB, attn="sdpa", lora=LoraSettings(r=8, alpha=16), precision=precision
        )
        for ckpt in (False, True):  # the plain forward first: enabling cannot be undone here
            if ckpt:
                from train.model import enable_grad_checkpointing

                enable_grad_checkpointing(model)
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            saved: dict[int, int] = {}

            def pack(t, saved=saved, params=params):
                if t.untyped_storage().data_ptr() not in params:
                    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            batch = make_batch([16] * 8, VOCAB)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                forward_hidden(model, batch)
            kept = batch.num_tokens * (2 * b * 64 + 4 * 64 + 4)
            if ckpt:
                assert sum(saved.values()) == kept, precision
            else:  # the control: without checkpointing every layer keeps many times more
                assert sum(saved.values()) > 4 * kept, precision


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors that ops create while they are alive (one count per storage; an op
    that writes in place or returns a view allocates nothing)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs | {0}:
                self._track(t)
        return out

    def _track(self, t):
        key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        if key not in self.refs:
            self.refs[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key, nbytes)

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loss_chunk_term_is_the_fused_loss_peak(precision):
    """The estimate's loss chunk is what a training step's loss (fused, frozen head as with LoRA, bf16
    under autocast as on a GPU) holds at its peak, within the [N, D] and [n] side buffers; the
    checkpointed reference's peak is larger (the control: the probe sees the chunk's buffers)."""
    from train.loss import checkpointed_cross_entropy_sum, chunked_cross_entropy_sum
    from train.memory import estimate_memory, model_shape

    vocab, chunk, num_tokens = 4000, 32, 65  # 64 positions: two full chunks
    shape = model_shape("tiny-qwen2", vocab_size=vocab)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    estimate = estimate_memory(shape, tokens=num_tokens, lora_r=8, precision=precision, chunk_tokens=chunk)
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(shape.hidden_size, vocab, bias=False, dtype=dtype).requires_grad_(False)
    hidden = torch.randn(num_tokens, shape.hidden_size, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    peaks = []
    for loss_fn in (chunked_cross_entropy_sum, checkpointed_cross_entropy_sum):
        with contextlib.ExitStack() as stack:
            if dtype == torch.bfloat16:
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            probe = stack.enter_context(_LiveBytes())
            loss, _ = loss_fn(hidden, head, labels, chunk_tokens=chunk)
            loss.backward()
        peaks.append(probe.peak)
    side = num_tokens * shape.hidden_size * 4 * 2 + chunk * 64 * 8  # grad_hidden and its cast; [n] vectors
    assert estimate.loss_chunk <= peaks[0] <= estimate.loss_chunk + side, (peaks[0], estimate.loss_chunk)
    assert peaks[1] > estimate.loss_chunk + side


QWEN_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
"""Qwen2.5-0.5B's config.json (the shape fields): `train plan --model` reads nothing else."""


def _plan(*args: str):
    from typer.testing import CliRunner

    from train.cli import app

    return CliRunner().invoke(app, ["plan", "--max-steps", "10", *args])


def test_plan_model_prints_the_estimate_and_whether_it_fits(tmp_path):
    import json
    import re

    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN_05B))
    fits = _plan("--batch-size", "8", "--seq-len", "1024", "--model", str(folder), "--gpu-memory", "24GiB")
    assert fits.exit_code == 0, fits.output
    out = fits.output
    # Qwen2.5-0.5B has 494,032,768 parameters (tied embeddings); LoRA r=32 on all 7 projections: 17.6M
    assert "494,032,768 parameters, 24 layers, 17,596,416 trainable (LoRA r=32)" in out
    assert re.search(r"^memory estimate +12\.69 GiB peak +\(bf16, 8,192 tokens per micro-batch", out, re.M), (
        out
    )
    assert re.search(r"^fits +yes$", out, re.M), out

    tight = _plan("--batch-size", "16", "--seq-len", "4096", "--model", str(folder), "--gpu-memory", "24GB")
    assert tight.exit_code == 0, tight.output
    match = re.search(
        r"fits +no; with --batch-size (\d+) --grad-accum (\d+) \(same tokens per step", tight.output
    )
    assert match, tight.output
    rows, accum = int(match[1]), int(match[2])
    assert rows * accum == 16 and rows < 16  # the same tokens per step, in smaller micro-batches

    from train.memory import estimate_memory, model_shape

    shape = model_shape(str(folder))
    assert estimate_memory(shape, tokens=rows * 4096, lora_r=32).total <= 0.9 * 24 * 2**30
    assert estimate_memory(shape, tokens=2 * rows * 4096, lora_r=32).total > 0.9 * 24 * 2**30  # the largest

    hopeless = _plan(
        "--seq-len", "32768", "--batch-size", "1", "--model", str(folder), "--gpu-memory", "2GiB"
    )
    assert "fits             no, not even 1 row per micro-batch with --grad-checkpointing" in hopeless.output


def test_plan_model_refuses_what_it_cannot_read(tmp_path, packed_sample):
    assert "not a model folder (no config.json there)" in _plan("--model", str(tmp_path)).output
    assert "takes its vocabulary from the data: add --data" in _plan("--model", "tiny-qwen2").output
    bad = _plan("--model", "tiny-qwen2", "--data", str(packed_sample), "--gpu-memory", "lots")
    assert bad.exit_code == 1 and "--gpu-memory 'lots' is not a size" in bad.output
    assert "--gpu-memory needs --model" in _plan("--gpu-memory", "24GiB").output
    ok = _plan("--model", "tiny-qwen2", "--data", str(packed_sample), "--batch-size", "2")
    assert ok.exit_code == 0 and "trainable (LoRA r=32)" in ok.output


@pytest.mark.slow
def test_a_checkpointed_run_logs_the_losses_of_a_plain_one(packed_sample, tmp_path):
    """Through `train run`'s loop (accumulation, chunked loss, AdamW): the same losses, fp32 on CPU."""
    from train.config import RunConfig
    from train.loop import train

    def run(name: str, **kw) -> dict[int, float]:
        cfg = RunConfig(
            data=packed_sample,
            out=tmp_path / name,
            model="tiny-qwen2",
            max_steps=3,
            batch_size=2,
            grad_accum=2,
            lr=1e-2,
            eval_every=0,
            device="cpu",
            attn="sdpa",
            lora_r=8,
            lora_alpha=16,
            **kw,
        )
        return train(cfg, log=lambda _: None).losses

    plain, ckpt = run("plain"), run("ckpt", grad_checkpointing=True)
    assert plain.keys() == ckpt.keys() == {1, 2, 3}
    for step, loss in plain.items():
        assert ckpt[step] == pytest.approx(loss, rel=1e-6, abs=0.0), step
    assert plain[3] != pytest.approx(plain[1], rel=1e-3)  # the steps trained: later losses differ
