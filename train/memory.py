"""Peak GPU memory of a training step, estimated from the model's config alone (`train plan --model`).

Nothing is loaded: the model is built on the ``meta`` device to count its parameters and read its
shapes. The estimate is the sum of four parts (bytes; ``b`` is the activation dtype's size, 2 for bf16):

    weights      frozen base x b_w (bf16: 2, fp32: 4) + trainable x 4 (fp32 master weights);
                 full fine-tuning in bf16 adds autocast's bf16 copy of every weight (x 2)
    train state  trainable params x 12: fp32 gradient (4) + AdamW's two moments (8)
    activations  what the forward keeps for the backward, T tokens per micro-batch (below)
    loss chunk   min(T, chunk) x vocab x (4 + c): one chunk of the fused cross-entropy (`train.loss`):
                 its fp32 logits, turned into their gradient in place, beside the b-sized matmul
                 output before the upcast or the b-sized cast of the gradient after it (c = b, or 0 in
                 fp32, where both casts are no-ops)

Activations of one Qwen2-style decoder layer, per token, for the varlen kernels (which keep q, k, v
and the output, plus a log-sum-exp per head; no T x T matrix). D hidden, Q = heads x head_dim,
K = kv_heads x head_dim, I intermediate, H heads, r the LoRA rank (0 without LoRA):

    two RMSNorms   2 x (4D + 4 + b D)      fp32 input and 1/rms kept by each, and its b-sized output
    attention      b (2Q + 2K) + 4H        q, k, v, output; the log-sum-exp in fp32
    MLP            4 b I                   gate, up, silu(gate), silu(gate) x up
    LoRA           7 b r                   each adapter's A output (q, k, v, o, gate, up, down)

    per_layer = b (4D + 2Q + 2K + 4I + 7r) + 8D + 8 + 4H

Without gradient checkpointing a micro-batch keeps ``T x (L x per_layer + extra)``, where ``extra``
(the final norm, the gradient wrt the hidden states that the fused loss computes in the forward and keeps
for the backward, RoPE's cos/sin) is ``4D + 4 + b D + 2 b head_dim``.
With it, each layer keeps only its input (``b D`` per token) and one layer at a time is recomputed in
the backward: ``T x (L x b D + extra + per_layer)``.

Not counted: the CUDA context, cuBLAS/kernel workspaces and the allocator's fragmentation, which is
why a plan "fits" only within 90% of the GPU's memory; and transient buffers of the backward.
``benchmarks/gpu_bench.py`` prints this estimate next to the measured peak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from shared.errors import UserError
from train.loss import DEFAULT_CHUNK_TOKENS
from train.model import LORA_TARGETS, TINY_QWEN2, tiny_qwen2_config

USABLE_SHARE = 0.9
"""Share of a GPU's memory a plan may fill; the rest is the CUDA context, workspaces, fragmentation."""

GIB = 2**30


class MemoryPlanError(UserError):
    """`train plan --model` cannot read the model or the memory size it was given."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelShape:
    """What the estimate needs from a causal LM's config (and its meta-device build)."""

    name: str
    num_params: int
    """Every parameter once (tied embeddings counted once)."""
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    lora_linears: tuple[tuple[int, int], ...]
    """(in_features, out_features) of every linear layer LoRA adapts, all layers."""

    def num_lora_params(self, r: int) -> int:
        return sum(r * (n_in + n_out) for n_in, n_out in self.lora_linears)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    weights: int
    train_state: int
    activations: int
    loss_chunk: int
    num_trainable: int
    tokens: int
    """Tokens per micro-batch (batch_size x seq_len: the capacity, an upper bound of the real count)."""

    @property
    def total(self) -> int:
        return self.weights + self.train_state + self.activations + self.loss_chunk


def model_shape(spec: str, *, vocab_size: int | None = None) -> ModelShape:
    """The shape of model ``spec`` (a Hugging Face folder or ``tiny-qwen2``), without loading weights."""
    return shape_of_config(_config(spec, vocab_size), name=spec)


def shape_of_config(config: PretrainedConfig, *, name: str) -> ModelShape:
    """The shape of a causal LM built from ``config`` on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = LORA_TARGETS.get(config.model_type, ())
    linears = tuple(
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    num_heads = config.num_attention_heads
    return ModelShape(
        name=name,
        num_params=sum(p.numel() for p in model.parameters()),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        vocab_size=config.vocab_size,
        lora_linears=linears,
    )


def _config(spec: str, vocab_size: int | None) -> PretrainedConfig:
    if spec == TINY_QWEN2:
        if vocab_size is None:
            raise MemoryPlanError("`--model tiny-qwen2` takes its vocabulary from the data: add --data.")
        return tiny_qwen2_config(vocab_size)
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise MemoryPlanError(
            f"--model `{spec}` is not a model folder (no config.json there); pass a local Hugging Face"
            f" causal-LM folder (only its config.json is read) or `{TINY_QWEN2}`."
        )
    return AutoConfig.from_pretrained(folder)


def layer_bytes_per_token(shape: ModelShape, *, act_bytes: int, lora_r: int) -> int:
    """``per_layer`` of the module docstring: what one decoder layer keeps per token."""
    d, i, h = shape.hidden_size, shape.intermediate_size, shape.num_heads
    q, k = h * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return act_bytes * (4 * d + 2 * q + 2 * k + 4 * i + 7 * lora_r) + 8 * d + 8 + 4 * h


def estimate_memory(
    shape: ModelShape,
    *,
    tokens: int,
    lora_r: int | None,
    precision: str = "bf16",
    grad_checkpointing: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> MemoryEstimate:
    """Peak memory of one training step with ``tokens`` tokens per micro-batch (module docstring).

    ``lora_r=None`` is full fine-tuning; ``precision`` is the compute dtype, ``bf16`` or ``fp32``.
    """
    b = {"bf16": 2, "fp32": 4}[precision]
    if lora_r is None:
        trainable = shape.num_params
        weights = trainable * 4 + (trainable * 2 if precision == "bf16" else 0)
    else:
        trainable = shape.num_lora_params(lora_r)
        weights = shape.num_params * b + trainable * 4
    d = shape.hidden_size
    per_layer = layer_bytes_per_token(shape, act_bytes=b, lora_r=lora_r or 0)
    extra = 4 * d + 4 + b * d + 2 * b * shape.head_dim
    if grad_checkpointing:
        per_token = shape.num_layers * b * d + extra + per_layer
    else:
        per_token = shape.num_layers * per_layer + extra
    return MemoryEstimate(
        weights=weights,
        train_state=trainable * 12,
        activations=tokens * per_token,
        loss_chunk=min(tokens, chunk_tokens) * shape.vocab_size * (4 + (b if b < 4 else 0)),
        num_trainable=trainable,
        tokens=tokens,
    )


def parse_memory(text: str) -> int:
    """``24GiB``, ``24GB``, ``80 GiB``, ``16000MiB`` -> bytes (GB and GiB both mean 2**30 here: GPU
    makers' "24 GB" cards hold 24 GiB)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?)\s*", text, flags=re.IGNORECASE)
    if m is None:
        raise MemoryPlanError(f"--gpu-memory {text!r} is not a size; write it like 24GiB, 80GB or 16000MiB.")
    power = "KMGT".index(m.group(2)[0].upper()) + 1
    return int(float(m.group(1)) * 1024**power)


@dataclass(frozen=True, kw_only=True, slots=True)
class Fit:
    """Whether a step fits, and the settings with the same tokens per step that would."""

    fits: bool
    usable: int
    batch_size: int | None = None
    grad_accum: int | None = None
    grad_checkpointing: bool = False
    estimate: MemoryEstimate | None = None
    """The estimate at the suggested settings (None when nothing fits)."""


def find_fit(
    shape: ModelShape,
    *,
    gpu_bytes: int,
    batch_size: int,
    seq_len: int,
    grad_accum: int,
    lora_r: int | None,
    precision: str,
    grad_checkpointing: bool,
) -> Fit:
    """Does the plan fit ``gpu_bytes``? If not, the largest micro-batch that does with the same tokens
    per step (batch_size / k rows, grad_accum x k), first without, then with gradient checkpointing."""
    usable = int(gpu_bytes * USABLE_SHARE)

    def est(rows: int, ckpt: bool) -> MemoryEstimate:
        return estimate_memory(
            shape, tokens=rows * seq_len, lora_r=lora_r, precision=precision, grad_checkpointing=ckpt
        )

    if est(batch_size, grad_checkpointing).total <= usable:
        return Fit(fits=True, usable=usable)
    for ckpt in (grad_checkpointing, True) if not grad_checkpointing else (True,):
        for k in range(1, batch_size + 1):
            if batch_size % k or (k == 1 and ckpt == grad_checkpointing):
                continue
            candidate = est(batch_size // k, ckpt)
            if candidate.total <= usable:
                return Fit(
                    fits=False,
                    usable=usable,
                    batch_size=batch_size // k,
                    grad_accum=grad_accum * k,
                    grad_checkpointing=ckpt,
                    estimate=candidate,
                )
    return Fit(fits=False, usable=usable)


def describe_memory(
    shape: ModelShape,
    estimate: MemoryEstimate,
    *,
    precision: str,
    grad_checkpointing: bool,
    lora_r: int | None,
) -> list[str]:
    """The estimate as aligned lines, one per part, for `train plan`."""
    what = f"LoRA r={lora_r}" if lora_r is not None else "full fine-tuning"
    return [
        f"model            {shape.name}: {shape.num_params:,} parameters, {shape.num_layers} layers,"
        f" {estimate.num_trainable:,} trainable ({what})",
        f"memory estimate  {estimate.total / GIB:>12.2f} GiB peak  ({precision}, {estimate.tokens:,} tokens"
        f" per micro-batch, grad checkpointing {'on' if grad_checkpointing else 'off'})",
        f"  weights        {estimate.weights / GIB:>12.2f} GiB",
        f"  grads + AdamW  {estimate.train_state / GIB:>12.2f} GiB",
        f"  activations    {estimate.activations / GIB:>12.2f} GiB",
        f"  loss chunk     {estimate.loss_chunk / GIB:>12.2f} GiB",
    ]


def describe_fit(fit: Fit, gpu_bytes: int, *, batch_size: int, grad_accum: int) -> list[str]:
    head = (
        f"GPU memory       {gpu_bytes / GIB:>12.2f} GiB ({fit.usable / GIB:.2f} usable at {USABLE_SHARE:.0%})"
    )
    if fit.fits:
        return [head, "fits             yes"]
    if fit.estimate is None:
        return [
            head,
            "fits             no, not even 1 row per micro-batch with --grad-checkpointing; use a GPU with"
            " more memory, a shorter --seq-len (pack again), or a smaller model",
        ]
    flags = f"--batch-size {fit.batch_size} --grad-accum {fit.grad_accum}"
    if fit.grad_checkpointing:
        flags += " --grad-checkpointing"
    return [
        head,
        f"fits             no; with {flags} (same tokens per step as batch {batch_size} x grad_accum"
        f" {grad_accum}): {fit.estimate.total / GIB:.2f} GiB",
    ]
