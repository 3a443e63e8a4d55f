"""Load a causal LM (a local Hugging Face folder or the built-in `tiny-qwen2`) and run it the varlen way.

The model trains on one flat ``[1, T]`` stream with explicit ``cu_seqlens`` (see `train.batch`): no
padding, no 2D attention mask, no KV cache. Without boundaries it runs one sequence at a time (so
``generate()`` works on one prompt); `train.attention` states the rule. :func:`forward_hidden` returns
the final hidden states ``[1, T, D]``; the loss (`train.loss`) applies the output head in chunks, so the
full ``[T, V]`` logits never exist at once.

:func:`forward_hidden_naive` runs the same model over the packed row with a plain causal mask (one
segment spanning the row) and the row's restarting position ids. It leaks across documents, which is
exactly why it exists: it is the negative control the isolation tests and `train check
--negative-control` must reject. Training never uses it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, Qwen2Config

from shared.errors import UserError
from train.attention import backend_of, implementation_name, refuse_padding_mask, varlen_kwargs
from train.batch import VarlenBatch
from train.hardware import compute_dtype, resolve_device

TINY_QWEN2 = "tiny-qwen2"

LORA_TARGETS = {
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
"""LoRA target modules per ``config.model_type``: every attention and MLP projection."""


class ModelError(UserError):
    """The model cannot be loaded or does not fit the dataset."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraSettings:
    r: int = 32
    """LoRA rank."""
    alpha: int = 64
    """Scaling numerator: the adapter's output is multiplied by alpha / r."""
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    """Module names to adapt; default per architecture (`LORA_TARGETS`)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ModelError(
                f"LoRA rank {self.r} and alpha {self.alpha} must be at least 1 (--lora-r, --lora-alpha)."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"LoRA dropout {self.dropout} must be in [0, 1).")


def tiny_qwen2_config(vocab_size: int) -> Qwen2Config:
    """A two-layer Qwen2 with GQA (4 query heads, 2 key/value heads), small enough for CPU tests.

    ``initializer_range`` is larger than Qwen2's 0.02 so that attention is far from uniform and a
    cross-document leak moves the logits well above fp32 round-off.
    """
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        initializer_range=0.2,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        use_cache=False,
    )


def default_dtype(device: torch.device, *, lora: bool, precision: str = "auto") -> torch.dtype:
    """The dtype weights are stored in. Frozen LoRA base weights take the compute dtype (bf16 halves
    them); trained weights stay fp32 master weights, computed in bf16 through autocast."""
    compute = compute_dtype(precision, device)
    return compute if lora else torch.float32


def load_model(
    spec: str,
    *,
    vocab_size: int | None,
    attn: str = "auto",
    lora: LoraSettings | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    precision: str = "auto",
    grad_checkpointing: bool = False,
    compiled: bool = False,
) -> nn.Module:
    """The model ready for varlen training: on ``device``, in train mode, with our attention backend.

    ``spec`` is a local Hugging Face causal-LM folder or ``tiny-qwen2`` (random weights seeded by
    ``seed``; its vocabulary is ``vocab_size``, from the dataset manifest). ``lora=None`` trains every
    weight; otherwise only a peft LoRA adapter is trainable. ``precision`` is ``--dtype`` (the compute
    dtype, `compute_dtype`); ``dtype`` overrides the dtype the weights are stored in (tests use float64).
    ``grad_checkpointing`` recomputes each decoder layer in the backward (`enable_grad_checkpointing`);
    ``compiled`` compiles each decoder layer with inductor (`compile_layers`).
    """
    device = resolve_device(device)
    compute = compute_dtype(precision, device)
    dtype = dtype or default_dtype(device, lora=lora is not None, precision=precision)
    model = load_base(spec, vocab_size=vocab_size, dtype=dtype, device=device, seed=seed)
    model = _prepare(
        model, attn=attn, lora=lora, device=device, seed=seed, grad_checkpointing=grad_checkpointing
    )
    causal_lm(model).packed_compute_dtype = compute
    if compiled:
        compile_layers(model)
    return model


def load_base(
    spec: str,
    *,
    vocab_size: int | None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """The plain transformers model ``spec`` names, with its standard attention: the weights
    :func:`load_model` starts from (a folder's, or `tiny-qwen2`'s seeded random ones) before our attention
    and LoRA. ``dtype=None`` keeps a folder's stored dtype (fp32 for `tiny-qwen2`)."""
    if spec == TINY_QWEN2:
        if vocab_size is None:
            raise ModelError("`tiny-qwen2` needs the vocabulary size (the dataset manifest's tokenizer).")
        device = resolve_device(device)
        with _seeded(seed, device), device:
            model = AutoModelForCausalLM.from_config(tiny_qwen2_config(vocab_size))
        return model.to(dtype or torch.float32)
    return _load_pretrained(spec, vocab_size, dtype or "auto").to(resolve_device(device))


def model_from_config(
    config: PretrainedConfig,
    *,
    attn: str = "auto",
    lora: LoraSettings | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    precision: str = "auto",
    grad_checkpointing: bool = False,
    compiled: bool = False,
) -> nn.Module:
    """A causal LM with random weights (seeded) for ``config``, prepared like :func:`load_model`'s.

    The weights are initialised directly on ``device``, so a GPU builds a 1.5B model in seconds.
    """
    device = resolve_device(device)
    compute = compute_dtype(precision, device)
    dtype = dtype or default_dtype(device, lora=lora is not None, precision=precision)
    with _seeded(seed, device), device:
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model = _prepare(
        model, attn=attn, lora=lora, device=device, seed=seed, grad_checkpointing=grad_checkpointing
    )
    causal_lm(model).packed_compute_dtype = compute
    if compiled:
        compile_layers(model)
    return model


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' progress bars (``Loading weights``, ``Writing model shards``) off for one command.

    Our commands say what they loaded and wrote in their own lines; a bar per load is noise there, and
    piped into a log it is a line of carriage returns. Only the bars: transformers' verbosity is left as
    it is, so its warnings (weights missing from a checkpoint, say) still print. The bars come back
    afterwards, so a program that calls the library keeps them.
    """
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed inside a forked RNG, so that building a model never shifts the caller's random stream."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _prepare(
    model: nn.Module,
    *,
    attn: str,
    lora: LoraSettings | None,
    device: torch.device,
    seed: int,
    grad_checkpointing: bool = False,
):
    model.set_attn_implementation(implementation_name(attn, device))
    model.get_decoder().register_forward_pre_hook(refuse_padding_mask, with_kwargs=True)
    model.config.use_cache = False
    if grad_checkpointing:
        enable_grad_checkpointing(model)
    if lora is not None:
        with _seeded(seed, device):
            model = _apply_lora(model, lora)
    model.to(device)
    model.train()
    assert backend_of(causal_lm(model)) in ("flash_attn", "torch_varlen", "sdpa")
    return model


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Keep only each decoder layer's input in the forward and recompute the layer in the backward.

    Non-reentrant ``torch.utils.checkpoint``: the reentrant kind returns no gradient to a LoRA adapter
    when the layer's input does not require grad (the frozen embedding's output does not), which is why
    peft recipes call ``enable_input_require_grads``; non-reentrant checkpointing needs no such hook.
    The varlen boundaries reach the recomputed attention as keyword arguments, as in the forward.
    """
    if layers_compiled(model):  # it would checkpoint inside the compiled code (see `compile_layers`)
        raise ModelError("enable gradient checkpointing before `compile_layers`, not after.")
    lm = causal_lm(model)
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


COMPILE_BACKEND = "inductor"


def compile_problem(device: torch.device | str, backend: str = COMPILE_BACKEND) -> str | None:
    """Why ``backend`` cannot compile for ``device`` here (a sentence ending in the fix), or None."""
    device = resolve_device(device)
    if backend != COMPILE_BACKEND:
        return None  # aot_eager and eager generate no code (the benchmark's CPU smoke uses them)
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return (
            "--compile needs Triton on a CUDA GPU (inductor writes Triton kernels), and `triton` is not"
            " installed: install the `triton` that matches this torch (the CUDA builds of torch bring it),"
            " or drop --compile."
        )
    if device.type == "cpu":
        # Where torch._inductor.config.cpp.cxx looks: $CXX, else g++ (clang++ on macOS).
        cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(cxx) is None:
            return (
                f"--compile needs a C++ compiler on the CPU (inductor compiles C++ kernels), and `{cxx}`"
                " is not on PATH: install one (e.g. `apt-get install g++`) or name it in $CXX, or drop"
                " --compile."
            )
    if device.type not in ("cuda", "cpu"):
        return f"--compile runs on CUDA and CPU; it is not tried on {device.type}. Drop --compile."
    return None


def compile_layers(model: nn.Module, backend: str = COMPILE_BACKEND) -> int:
    """Compile each decoder layer's forward with ``torch.compile(backend, dynamic=True)``, in place; the
    number of layers compiled.

    The layers share their code, and their weights are the graph's inputs, so they share compiled graphs:
    compiling costs about one layer's time (twice: the first layer's input needs no gradient under LoRA,
    the others' do; once more under ``no_grad`` for evaluation), not the model's. ``dynamic=True`` makes
    the token count, the segment count and ``max_seqlen`` symbolic, so a new micro-batch shape does not
    recompile. Only each layer's ``forward`` is replaced (an instance attribute), so parameter names and
    the state dict are those of the eager model: checkpoints, adapters and exports are interchangeable.

    Gradient checkpointing (`enable_grad_checkpointing`) stays outside the compiled code: transformers
    checkpoints inside a layer's forward, which torch.compile cannot trace (a side effect in the layer
    under the checkpoint makes it give up and run the layer eagerly, without a word); so the layer's own
    checkpointing is turned off here and the compiled forward is checkpointed instead (non-reentrant,
    the same recompute). Call this last, after LoRA and checkpointing are set up.
    """
    if problem := compile_problem(next(model.parameters()).device, backend):
        raise ModelError(problem)
    layers = causal_lm(model).get_decoder().layers
    for layer in layers:
        if "forward" in vars(layer):
            raise ModelError("compile_layers: the model's decoder layers are compiled already.")
        recompute = bool(getattr(layer, "gradient_checkpointing", False))
        layer.gradient_checkpointing = False
        compiled = torch.compile(layer.forward, backend=backend, dynamic=True)
        layer.forward = functools.partial(_checkpointed, compiled) if recompute else compiled
    return len(layers)


def _checkpointed(forward, *args, **kwargs):
    """``forward`` under non-reentrant activation checkpointing when there is a backward to recompute for."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def layers_compiled(model: nn.Module) -> bool:
    """Whether :func:`compile_layers` compiled ``model``'s decoder layers."""
    layers = causal_lm(model).get_decoder().layers
    return len(layers) > 0 and all("forward" in vars(layer) for layer in layers)


def _load_pretrained(spec: str, vocab_size: int | None, dtype: torch.dtype | str) -> nn.Module:
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"--model `{spec}` is not a model folder (no config.json there). Pass a local Hugging Face"
            f" causal-LM folder (Qwen2/Qwen2.5, Llama-style) or `{TINY_QWEN2}`."
        )
    config = AutoConfig.from_pretrained(folder)
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ModelError(
            f"the dataset's tokenizer has {vocab_size:,} tokens but model `{spec}` has an embedding for"
            f" {config.vocab_size:,}: they do not belong together. Pack with this model's tokenizer."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model `{spec}` ({e}).") from e
    # peft writes this into adapter_config.json as the base: absolute, so that the adapter loads from
    # any working directory.
    model.name_or_path = model.config._name_or_path = str(folder.resolve())
    return model


def _apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules or LORA_TARGETS.get(model.config.model_type)
    if targets is None:
        raise ModelError(
            f"no default LoRA target modules for model type {model.config.model_type!r}; known:"
            f" {', '.join(LORA_TARGETS)}. Pass LoraSettings(target_modules=...)."
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 property that warns of its own deprecation: not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    if model.dtype in (torch.bfloat16, torch.float16):
        _skip_adapter_input_casts(peft_model)
    return peft_model


def _skip_adapter_input_casts(model: nn.Module) -> None:
    """Stop peft from casting each adapter's input to the adapter's fp32 dtype.

    A half-precision base runs under autocast, which casts that fp32 copy straight back to bf16 for the
    matmul: the values are the same either way (bf16 -> fp32 -> bf16 is exact), but each LoRA layer
    paid two full-size copies of its input, forward and backward, and dtype copies are a large share of
    a step's GPU time (benchmarks/NOTES.md; `benchmarks/gpu_profile.py` measures it). The adapters stay
    fp32 master weights.
    """
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside DDP and peft wrappers (or the model itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module) -> nn.Module:
    """The module mapping hidden states to logits (``lm_head``; tied or not, LoRA-wrapped or not)."""
    return causal_lm(model).get_output_embeddings()


def input_embeddings(model: nn.Module) -> nn.Module:
    return causal_lm(model).get_input_embeddings()


def autocast_for(device: torch.device, dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """Autocast to the compute ``dtype`` (nothing for fp32 or fp64); without one, bf16 on CUDA and
    nothing elsewhere (fp32 there, so CPU results are exact references)."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_of(model: nn.Module, device: torch.device) -> contextlib.AbstractContextManager:
    """:func:`autocast_for` at the compute dtype ``model`` was loaded with (``--dtype``)."""
    return autocast_for(device, getattr(causal_lm(model), "packed_compute_dtype", None))


def forward_hidden(
    model: nn.Module, batch: VarlenBatch, *, inputs_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """Final hidden states ``[1, T, D]`` of the varlen forward: attention confined to ``batch.cu_seqlens``.

    ``inputs_embeds`` replaces the token embeddings (tests use it to take gradients with respect to
    one document's inputs).
    """
    _check_batch(batch)
    return _run_decoder(model, batch, batch.cu_seqlens, batch.max_seqlen, inputs_embeds)


def forward_hidden_naive(
    model: nn.Module, batch: VarlenBatch, *, inputs_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """NEGATIVE CONTROL ONLY: the packed row under one causal mask, boundaries ignored.

    Position ids still restart at every segment, which shows that position resets do not isolate
    documents. Never train with this.
    """
    _check_batch(batch)
    num_tokens = batch.num_tokens
    whole_row = torch.tensor([0, num_tokens], dtype=torch.int32, device=batch.cu_seqlens.device)
    return _run_decoder(model, batch, whole_row, num_tokens, inputs_embeds)


def _run_decoder(model, batch: VarlenBatch, cu_seqlens, max_seqlen, inputs_embeds) -> torch.Tensor:
    decoder = causal_lm(model).get_decoder()
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch.input_ids}
    with autocast_of(model, batch.input_ids.device):
        out = decoder(
            **inputs,
            position_ids=batch.position_ids,
            use_cache=False,
            **varlen_kwargs(cu_seqlens, max_seqlen),
        )
    return out.last_hidden_state


def _check_batch(batch: VarlenBatch) -> None:
    """Shape checks that cost no device synchronisation."""
    if batch.input_ids.dim() != 2 or batch.input_ids.shape[0] != 1:
        raise ModelError(
            f"a VarlenBatch holds one flat [1, T] stream; got input_ids of shape {tuple(batch.input_ids.shape)}."
        )
    if batch.position_ids.shape != batch.input_ids.shape or batch.labels.shape != batch.input_ids.shape:
        raise ModelError(
            f"input_ids {tuple(batch.input_ids.shape)}, labels {tuple(batch.labels.shape)} and position_ids"
            f" {tuple(batch.position_ids.shape)} must have the same shape."
        )
    if batch.cu_seqlens.dim() != 1 or batch.cu_seqlens.numel() < 2:
        raise ModelError(
            f"cu_seqlens must be 1-D with at least 2 entries; got shape {tuple(batch.cu_seqlens.shape)}."
        )
    if batch.cu_seqlens.device.type == "cpu" and int(batch.cu_seqlens[-1]) != batch.num_tokens:
        raise ModelError(
            f"cu_seqlens ends at {int(batch.cu_seqlens[-1])} but the batch has {batch.num_tokens} tokens."
        )
