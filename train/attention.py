"""Varlen attention with explicit document boundaries, plugged into Hugging Face models.

Every backend computes causal attention restricted to the blocks that ``cu_seqlens`` delimits in one
flat ``[1, T]`` stream. For the row ``[a0 a1 E | b0 b1 E]`` (``cu_seqlens = [0, 3, 6]``) the allowed
query/key pairs are::

              a0 a1 E  b0 b1 E
        a0    x
        a1    x  x
        E     x  x  x
        b0             x
        b1             x  x
        E              x  x  x

Backends, chosen with ``attn``:

- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (FlashAttention-2, CUDA, optional package).
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, half precision).
- ``sdpa``: a reference that runs ``scaled_dot_product_attention(is_causal=True)`` on each segment
  alone; it runs anywhere, CPU included, and is what the others are checked against.
- ``auto``: the fastest one available for the device.

Each backend is registered with ``transformers.AttentionInterface`` under its own name, and the
boundaries travel through the model's forward kwargs with the names transformers' own flash path uses
(``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``). Isolation never comes from
``position_ids``, and never from a mask: a mask is how a leaky setup (a causal mask over the whole
packed row) gets in, so any attention mask that reaches these functions is refused. Our names are not
registered as mask functions, so transformers builds no mask for them.

The rule for a forward without boundaries (no ``cu_seq_lens_q``), e.g. ``model.generate()``:

- one unpacked sequence runs standard causal attention (SDPA, any device, with or without a KV cache):
  batch size 1, no mask, and position ids that count up by one (``p, p+1, ..., p+T-1``). A sequence
  alone has nothing to leak into, so this is what plain transformers computes;
- anything else is refused: position ids that restart (a packed row without its ``cu_seqlens``),
  several rows, no position ids at all, or any mask. A 2D padding mask never reaches attention (no mask
  is built for our names), so :func:`refuse_padding_mask`, a pre-hook on the decoder, refuses one that
  hides any token; an all-ones mask (what a tokenizer returns for one prompt) says nothing and passes.

Training never takes this path: `train.model.forward_hidden` always passes the batch's boundaries.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from shared.errors import UserError

ATTN_CHOICES = ("auto", "flash_attn", "torch_varlen", "sdpa")

# The names avoid the substrings "flash" and "sdpa": transformers treats implementations whose
# name contains them specially (imports, fallbacks to eager), which would bypass our functions.
IMPLEMENTATION_NAMES = {
    "flash_attn": "packed_varlen_fa2",
    "torch_varlen": "packed_varlen_torch",
    "sdpa": "packed_varlen_reference",
}


class AttentionSetupError(UserError):
    """The requested attention backend cannot run here, or the model was called without boundaries."""


@functools.cache
def flash_attn_available() -> bool:
    """Whether `flash_attn` imports (installed is not enough: a build for another torch fails here)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # ImportError, or an undefined-symbol OSError from a mismatched build
        return False
    return True


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


@dataclass(frozen=True, slots=True)
class AttnChoice:
    """Which backend runs and why: what the run's header prints and run.json records."""

    requested: str
    """The ``--attn`` value: ``auto`` or a backend name."""
    backend: str
    """What runs: ``flash_attn``, ``torch_varlen`` or ``sdpa``."""
    device_type: str
    reason: str
    """One clause a person reads: the request, or what ``auto`` found on this machine."""

    @property
    def is_gpu_reference(self) -> bool:
        """A CUDA run on the per-segment reference: correct, but several times slower than varlen."""
        return self.device_type == "cuda" and self.backend == "sdpa"


def choose_attn(attn: str, device: torch.device | str) -> AttnChoice:
    """The concrete backend for ``attn`` on ``device`` and the reason; raise if the choice cannot run."""
    device = torch.device(device)
    backend = resolve_attn(attn, device)
    if attn != "auto":
        reason = f"requested with --attn {attn}"
    elif device.type != "cuda":
        reason = f"auto on {device.type}: the varlen kernels need CUDA; the per-segment SDPA reference runs anywhere"
    elif backend == "flash_attn":
        reason = "auto on cuda: flash-attn is installed and imports"
    elif backend == "torch_varlen":
        reason = (
            f"auto on cuda: flash-attn does not import (not installed, or built for another torch);"
            f" torch {torch.__version__} has torch.nn.attention.varlen"
        )
    else:
        reason = (
            f"auto on cuda: flash-attn does not import and torch {torch.__version__} has no"
            " torch.nn.attention.varlen (torch >= 2.9)"
        )
    return AttnChoice(requested=attn, backend=backend, device_type=device.type, reason=reason)


def resolve_attn(attn: str, device: torch.device | str) -> str:
    """The concrete backend for ``attn`` on ``device``; raise if the choice cannot run there
    (:func:`choose_attn` says why it was chosen)."""
    device = torch.device(device)
    if attn not in ATTN_CHOICES:
        raise AttentionSetupError(f"--attn {attn!r} is unknown; choose one of {', '.join(ATTN_CHOICES)}.")
    on_cuda = device.type == "cuda"
    if attn == "auto":
        if on_cuda and flash_attn_available():
            return "flash_attn"
        if on_cuda and torch_varlen_available():
            return "torch_varlen"
        return "sdpa"
    if attn in ("flash_attn", "torch_varlen") and not on_cuda:
        raise AttentionSetupError(
            f"--attn {attn} needs a CUDA device, but the model is on {device}. Use `--attn sdpa` (the CPU"
            " reference) or `--attn auto`."
        )
    if attn == "flash_attn" and not flash_attn_available():
        raise AttentionSetupError(
            "--attn flash_attn needs the `flash-attn` package, which is not installed. Install the `gpu`"
            " extra (`pip install flash-attn --no-build-isolation`) or use `--attn torch_varlen`."
        )
    if attn == "torch_varlen" and not torch_varlen_available():
        raise AttentionSetupError(
            f"--attn torch_varlen needs torch.nn.attention.varlen (torch >= 2.9); this is torch"
            f" {torch.__version__}. Use `--attn flash_attn` or `--attn sdpa`."
        )
    return attn


def varlen_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict[str, torch.Tensor | int]:
    """The forward kwargs that carry the boundaries down to the attention function."""
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
    }


def _refuse_mask(attention_mask) -> None:
    if attention_mask is not None:
        raise AttentionSetupError(
            f"varlen attention got an attention mask of shape {tuple(attention_mask.shape)}; a mask over a"
            " packed row lets documents see each other. Pass no mask: boundaries come from `cu_seqlens`"
            " (call the model through `train.model.forward_hidden`)."
        )


def _boundaries(module: torch.nn.Module, query: torch.Tensor, attention_mask, kwargs: dict):
    """Validate the call and return ``(cu_seqlens, max_seqlen)``; refuse anything that could leak."""
    _refuse_mask(attention_mask)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    assert cu_q is not None, "calls without boundaries go to one_sequence_attention"
    if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise AttentionSetupError(
            "cu_seq_lens_k differs from cu_seq_lens_q; training attention is self-attention."
        )
    if query.shape[0] != 1:
        raise AttentionSetupError(
            f"varlen attention expects one flat [1, T] stream, got batch size {query.shape[0]}."
        )
    max_seqlen = kwargs.get("max_length_q")
    if max_seqlen is None:
        raise AttentionSetupError("varlen attention was called without `max_length_q`.")
    window = kwargs.get("sliding_window")
    # A window at least as long as the longest segment changes nothing; a shorter one we do not implement.
    if window is not None and window < max_seqlen:
        raise AttentionSetupError(
            f"layer {getattr(module, 'layer_idx', '?')} uses sliding-window attention (window {window})"
            f" and a segment has {max_seqlen} tokens; these backends do not implement windows. Pack with"
            f" --seq-len <= {window}."
        )
    return cu_q, int(max_seqlen)


def _has_boundaries(kwargs: dict) -> bool:
    return kwargs.get("cu_seq_lens_q") is not None


def _check_one_sequence(module: torch.nn.Module, query, key, attention_mask, kwargs: dict) -> None:
    """Refuse a forward without boundaries unless it is one unpacked sequence (the module docstring's rule)."""
    _refuse_mask(attention_mask)
    unbounded = "varlen attention was called without `cu_seq_lens_q`"
    fix = (
        " Call the model through `train.model.forward_hidden(model, batch)`, which passes the batch's"
        " cu_seqlens; to generate, pass one prompt (batch size 1) and no padding."
    )
    if query.shape[0] != 1:
        raise AttentionSetupError(
            f"{unbounded} on a batch of {query.shape[0]} rows; without boundaries only one sequence at a"
            f" time runs (a batch needs padding masks, which these backends refuse).{fix}"
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise AttentionSetupError(
            f"{unbounded} and without position ids, so it cannot tell one sequence from a packed row.{fix}"
        )
    positions = position_ids.reshape(-1)
    num_queries = query.shape[2]
    if positions.numel() != num_queries:
        raise AttentionSetupError(
            f"{unbounded} with {positions.numel()} position ids for {num_queries} tokens.{fix}"
        )
    # One device sync per layer, for prompts only: a decoding step (one token) has nothing to check.
    if num_queries > 1 and not torch.equal(positions[1:] - positions[:-1], torch.ones_like(positions[1:])):
        raise AttentionSetupError(
            f"{unbounded} on a packed row (its position ids restart): the model cannot tell where"
            f" documents start, and position ids do not isolate them.{fix}"
        )
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise AttentionSetupError(
            f"layer {getattr(module, 'layer_idx', '?')} uses sliding-window attention (window {window}) and"
            f" the sequence has {key.shape[2]} tokens; these backends do not implement windows."
        )


def one_sequence_attention(query, key, value, scale: float | None) -> torch.Tensor:
    """Causal attention of one unpacked sequence, its queries being the last of its keys (a KV cache
    holds the earlier ones). ``[1, H, T, D]`` in (transformers layout), ``[1, T, H, D]`` out."""
    num_queries, num_keys = query.shape[2], key.shape[2]
    mask = None
    if 1 < num_queries < num_keys:  # a chunk after cached tokens: causal, aligned to the last key
        mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=query.device)
        mask = mask.tril(diagonal=num_keys - num_queries)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        # One query (a decoding step) sees every key; a prompt without cache is plainly causal.
        is_causal=num_queries == num_keys and num_queries > 1,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2)


def _unbounded(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    """A forward without boundaries: one sequence runs standard causal attention, anything else is refused."""
    _check_one_sequence(module, query, key, attention_mask, kwargs)
    _refuse_dropout(dropout)
    return one_sequence_attention(query, key, value, scaling), None


def refuse_padding_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the decoder: refuse a 2D mask that hides tokens (padding); see the module docstring.

    transformers builds no 4D mask for our implementation names, so such a mask would otherwise be dropped
    without a word and the padding attended to.
    """
    config = getattr(module, "config", None)
    if getattr(config, "_attn_implementation", None) not in IMPLEMENTATION_NAMES.values():
        return  # switched back to a transformers implementation (sdpa, eager): that one applies the mask
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise AttentionSetupError(
            f"the model got a padding mask (attention_mask of shape {tuple(mask.shape)} with zeros); these"
            " attention backends take no mask, so padded prompts cannot run. Generate one prompt at a time"
            " without padding, or export the model (`train export --merge`) and use plain transformers."
        )


def _to_flat(query, key, value):
    """[1, H, T, D] (transformers layout) -> [T, H, D] (varlen layout)."""
    return query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)


def _half(x: torch.Tensor) -> torch.Tensor:
    # The CUDA flash kernels exist only for fp16/bf16 (fp32 inputs, e.g. RoPE-upcast ones, run in
    # bf16) and want packed [T, H, D] rows, which the transposed view from transformers is not.
    return (x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)).contiguous()


# Never traced by torch.compile (`train run --compile`): the boundaries come to the host (`tolist`) and
# the loop runs once per segment, so a traced version would break the graph at `tolist` and specialise
# on every segment count. Disabled, it is one clean break: the compiled layer runs up to attention,
# calls this eagerly, and goes on compiled after it.
@torch.compiler.disable
def reference_varlen(q_THD, k_THD, v_THD, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention per segment with SDPA: the CPU-capable reference the fast kernels must match.

    Supports GQA (fewer key/value heads than query heads). Returns ``[T, H, D]``.
    """
    bounds = cu_seqlens.tolist()
    if (
        bounds[0] != 0
        or bounds[-1] != q_THD.shape[0]
        or any(a >= b for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    ):
        raise AttentionSetupError(
            f"cu_seqlens {bounds[:8]}{'...' if len(bounds) > 8 else ''} must start at 0, increase strictly"
            f" and end at the number of tokens ({q_THD.shape[0]})."
        )
    enable_gqa = q_THD.shape[1] != k_THD.shape[1]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # SDPA wants [H, T, D]; each call sees only its own segment, so nothing can cross a boundary.
        q = q_THD[start:end].transpose(0, 1)
        k = k_THD[start:end].transpose(0, 1)
        v = v_THD[start:end].transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces, dim=0)


def _sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if not _has_boundaries(kwargs):
        return _unbounded(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    cu_seqlens, _ = _boundaries(module, query, attention_mask, kwargs)
    _refuse_dropout(dropout)
    q, k, v = _to_flat(query, key, value)
    out = reference_varlen(q, k, v, cu_seqlens, scaling)
    return out.unsqueeze(0), None


def _torch_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if not _has_boundaries(kwargs):
        return _unbounded(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    cu_seqlens, max_seqlen = _boundaries(module, query, attention_mask, kwargs)
    _refuse_dropout(dropout)
    q, k, v = (_half(x) for x in _to_flat(query, key, value))
    out = torch_varlen_call(q, k, v, cu_seqlens.to(torch.int32), max_seqlen, scaling)
    return out.to(query.dtype).unsqueeze(0), None


_VARLEN_PARAMS: list[tuple[str, ...]] = []


# A constant to torch.compile (`train run --compile`), which would otherwise trace `inspect` each time;
# cached by hand, as dynamo warns of tracing through a functools cache.
@torch.compiler.assume_constant_result
def _varlen_attn_params() -> tuple[str, ...]:
    if not _VARLEN_PARAMS:
        from torch.nn.attention.varlen import varlen_attn

        _VARLEN_PARAMS.append(tuple(inspect.signature(varlen_attn).parameters))
    return _VARLEN_PARAMS[0]


def torch_varlen_call(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen: int, scale: float | None) -> torch.Tensor:
    """Causal ``varlen_attn`` across the signatures torch has shipped it with.

    torch 2.9/2.10 take ``is_causal`` and no ``scale``; 2.11 spells causal ``window_size=(-1, 0)`` and
    adds ``scale``; 2.12+ add ``enable_gqa``. Without it, key/value heads are repeated for GQA.
    """
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_attn_params()
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    default_scale = q_THD.shape[-1] ** -0.5
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - default_scale) > 1e-12:
        raise AttentionSetupError(
            f"torch {torch.__version__}'s varlen_attn has no `scale`, and the model uses {scale} (not"
            f" 1/sqrt(head_dim)); use `--attn flash_attn` or `--attn sdpa`, or a newer torch."
        )
    if q_THD.shape[1] != k_THD.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q_THD.shape[1] // k_THD.shape[1]
            k_THD, v_THD = k_THD.repeat_interleave(groups, dim=1), v_THD.repeat_interleave(groups, dim=1)
    return varlen_attn(q_THD, k_THD, v_THD, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _flash_attn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if not _has_boundaries(kwargs):
        return _unbounded(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    from flash_attn import flash_attn_varlen_func

    cu_seqlens, max_seqlen = _boundaries(module, query, attention_mask, kwargs)
    _refuse_dropout(dropout)
    q, k, v = _to_flat(query, key, value)
    cu = cu_seqlens.to(torch.int32)
    # FlashAttention-2 handles GQA natively when k/v have fewer heads than q.
    out = flash_attn_varlen_func(
        _half(q), _half(k), _half(v), cu, cu, max_seqlen, max_seqlen, softmax_scale=scaling, causal=True
    )
    return out.to(query.dtype).unsqueeze(0), None


def _refuse_dropout(dropout: float) -> None:
    if dropout:
        raise AttentionSetupError(
            f"attention dropout {dropout} is not supported by the varlen backends; set the model config's"
            " `attention_dropout` to 0.0."
        )


_FUNCTIONS: dict[str, Callable] = {
    "flash_attn": _flash_attn_attention,
    "torch_varlen": _torch_varlen_attention,
    "sdpa": _sdpa_attention,
}


def register_backends() -> None:
    """Make our implementation names known to transformers (idempotent)."""
    for backend, name in IMPLEMENTATION_NAMES.items():
        AttentionInterface.register(name, _FUNCTIONS[backend])


def implementation_name(attn: str, device: torch.device | str) -> str:
    """The ``attn_implementation`` string to give a transformers model for ``attn`` on ``device``."""
    register_backends()
    return IMPLEMENTATION_NAMES[resolve_attn(attn, device)]


def backend_of(model: torch.nn.Module) -> str:
    """Which of our backends ``model`` runs (``flash_attn``/``torch_varlen``/``sdpa``); raise if none."""
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None)
    for backend, registered in IMPLEMENTATION_NAMES.items():
        if name == registered:
            return backend
    raise AttentionSetupError(
        f"the model uses attention implementation {name!r}, not one of ours; load it with"
        " `train.model.load_model` so that documents are isolated by cu_seqlens."
    )
