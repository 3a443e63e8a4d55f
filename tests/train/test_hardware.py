"""The hardware a researcher owns: gradient checkpointing that changes nothing but memory, `--dtype`,
device selection (CUDA, Apple MPS, CPU; mocked here, since this machine has neither GPU), and the
memory estimate of `train plan --model`."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from train.loss import micro_batch_loss_sum
from train.model import (
    LoraSettings,
    ModelError,
    auto_device,
    causal_lm,
    compute_dtype,
    load_model,
    resolve_device,
)

from .segments import make_batch

VOCAB = 300
TOLERANCE = 1e-12  # float64: the recomputed forward is the same arithmetic in the same order


def _loss_and_grads(grad_checkpointing: bool, calls: list[int]):
    model = load_model(
        "tiny-qwen2",
        vocab_size=VOCAB,
        attn="sdpa",
        lora=LoraSettings(r=4, alpha=8),
        dtype=torch.float64,
        seed=1,
        grad_checkpointing=grad_checkpointing,
    )
    # A LoRA B is zero at init, so its A gets no gradient: give B values to test every adapter weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
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
        mock.patch("train.model.unusable_gpu", return_value=gpu_problem),
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
    with pytest.raises(ModelError, match="found a GPU that torch cannot use: it has an NVIDIA GPU") as e:
        resolve_device("auto")
    assert "pass --device cpu to train on the CPU on purpose" in str(e.value)
    assert resolve_device("cpu") == torch.device("cpu")  # asked for by name: allowed


def test_mps_asked_for_where_there_is_none_says_why(machine):
    machine(mps=False, mps_built=False)
    with pytest.raises(ModelError, match="built without MPS"):
        resolve_device("mps")
    with pytest.raises(ModelError, match="CUDA is not available"):
        resolve_device("cuda")


def test_unusable_gpu_names_a_cpu_build_on_an_nvidia_machine():
    from train import model as model_module

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
            pytest.raises(ModelError, match="Tesla V100 has no bf16 support"),
        ):
            compute_dtype("bf16", torch.device("cuda"))
    with pytest.raises(ModelError, match="GradScaler"):
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
