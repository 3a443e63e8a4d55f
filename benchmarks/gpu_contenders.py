"""The contenders of ``gpu_bench.py``: one LoRA training harness each, all on the same model, rows and step.

Every harness trains the model that ``train.model.model_from_config`` builds (same seed, so the same
frozen weights and the same LoRA r=32/alpha=64 adapter on q, k, v, o, gate, up and down) on the same
micro-batches, with AdamW (same lr, no weight decay, no clipping, constant schedule), one micro-batch per
optimizer step. Each returns the loss of every step (mean over the step's target tokens, detached, so
recording it costs no host sync) and calls ``clock.step_done(i)`` after step ``i``.

- ``ours*``: ``train``'s public pieces (``forward_hidden``, ``micro_batch_loss_sum``, ``VarlenBatch``
  from ``train.loader.batch_from_rows``), batches already on the device. Variants: the attention backend
  (``torch_varlen``, ``flash_attn``), ``torch.compile`` per decoder layer, Liger kernels (RMSNorm,
  SwiGLU, RoPE, fused linear cross-entropy), and ``ours_unfused``: the checkpointed loss forced in place
  of our fused one, to measure what the fusion pays.
- ``hf_flatten_*``: what a Hugging Face user writes: ``DataCollatorWithFlattening`` over the documents
  (``position_ids``, no padding), ``model(**batch).loss`` over the full logits, peft as it comes. We drive
  the model directly with the collator's output, collated before timing like ours: this measures the
  model step, not a training framework.
- ``hf_trainer``: the same through ``transformers.Trainer`` (its loop, its dataloader and collation).
- ``trl_sft``: ``trl.SFTTrainer(padding_free=True)`` on the same packed rows (``seq_lengths`` per row, as
  TRL's own BFD packing writes them), TRL's collator and loss.
- ``control_wrong_labels``: NEGATIVE CONTROL. Ours with the labels off by one (each position scored on
  its own token). It must be reported as disagreeing, or the agreement check proves nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shared.reader import PackedRow
from train.attention import flash_attn_available, implementation_name
from train.batch import VarlenBatch
from train.loader import batch_from_rows
from train.loss import checkpointed_cross_entropy_sum, micro_batch_loss_sum
from train.model import (
    LoraSettings,
    autocast_for,
    autocast_of,
    causal_lm,
    compile_layers,
    enable_grad_checkpointing,
    forward_hidden,
    model_from_config,
    output_head,
)

LORA = LoraSettings(r=32, alpha=64)


@dataclass(kw_only=True)
class Work:
    """What every contender trains on."""

    config: object
    """The transformers config of the model (random weights, seeded)."""
    micro_batches: list[list[PackedRow]]
    """The packed rows of each optimizer step, in order."""
    device: torch.device
    lr: float
    tokenizer_file: Path
    """The tokenizer.json the rows were packed with (TRL wants a processing class)."""
    eos_token: str
    compile_backend: str = "inductor"
    seed: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.micro_batches)


class StepClock:
    """Wall time from the end of the warm-up steps to the end of the last step (device synced at both)."""

    def __init__(self, warmup: int, num_steps: int, device: torch.device) -> None:
        self.warmup, self.num_steps, self.device = warmup, num_steps, device
        self.start: float | None = None
        self.end: float | None = None

    def _now(self) -> float:
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_done(self, index: int) -> None:
        if index + 1 == self.warmup:
            self.start = self._now()
        if index + 1 == self.num_steps:
            self.end = self._now()

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return self.end - self.start


def _model(work: Work, attn: str) -> nn.Module:
    return model_from_config(work.config, attn=attn, lora=LORA, device=work.device, seed=work.seed)


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def _our_attn(work: Work) -> str:
    """The fast varlen backend on CUDA; the sdpa reference stands in on the CPU (smoke runs)."""
    return "torch_varlen" if work.device.type == "cuda" else "sdpa"


def _steps(
    model: nn.Module, lr: float, batches: list, mean_loss: Callable, clock: StepClock
) -> list[torch.Tensor]:
    """One AdamW step per batch on ``mean_loss(batch)``; the losses, left on the device (no host sync)."""
    optimizer = _optimizer(model, lr)
    losses = []
    for i, batch in enumerate(batches):
        loss = mean_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        clock.step_done(i)
    return losses


def _ours_loop(work: Work, clock: StepClock, model: nn.Module, loss_sum: Callable, labels_off_by_one=False):
    batches = [batch_from_rows(rows).to(work.device) for rows in work.micro_batches]
    if labels_off_by_one:
        # hidden[t] is scored against labels[t + 1]; rolled, that is labels[t], i.e. token t itself.
        batches = [dataclasses.replace(b, labels=torch.roll(b.labels, 1, dims=1)) for b in batches]
    return _steps(model, work.lr, batches, lambda b: loss_sum(model, b) / b.num_target_tokens, clock)


def ours(work: Work, clock: StepClock, attn: str | None = None) -> list[torch.Tensor]:
    return _ours_loop(work, clock, _model(work, attn or _our_attn(work)), micro_batch_loss_sum)


def ours_flash_attn(work: Work, clock: StepClock) -> list[torch.Tensor]:
    return ours(work, clock, attn="flash_attn")


def ours_grad_ckpt(work: Work, clock: StepClock) -> list[torch.Tensor]:
    """Ours with `--grad-checkpointing`: the same losses, less memory, one more forward per step."""
    model = _model(work, _our_attn(work))
    enable_grad_checkpointing(model)
    return _ours_loop(work, clock, model, micro_batch_loss_sum)


def ours_unfused(work: Work, clock: StepClock) -> list[torch.Tensor]:
    """Ours with the checkpointed loss (head recomputed in the backward) instead of the fused one that
    ``micro_batch_loss_sum`` picks for a plain head: the same losses, one more head matmul per chunk."""

    def loss_sum(model: nn.Module, batch: VarlenBatch) -> torch.Tensor:
        hidden = forward_hidden(model, batch)
        with autocast_of(model, hidden.device):
            return checkpointed_cross_entropy_sum(hidden, output_head(model), batch.labels)[0]

    return _ours_loop(work, clock, _model(work, _our_attn(work)), loss_sum)


def ours_compile(work: Work, clock: StepClock) -> list[torch.Tensor]:
    """`train run --compile`: each decoder layer compiled by ``train.model.compile_layers`` (the layers
    share their graphs, so compiling takes about one layer's time, and ``dynamic=True`` keeps a new token
    count from recompiling)."""
    model = _model(work, _our_attn(work))
    compile_layers(model, work.compile_backend)
    return _ours_loop(work, clock, model, micro_batch_loss_sum)


def control_wrong_labels(work: Work, clock: StepClock) -> list[torch.Tensor]:
    return _ours_loop(
        work, clock, _model(work, _our_attn(work)), micro_batch_loss_sum, labels_off_by_one=True
    )


def liger_missing() -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if not torch.cuda.is_available():
        return "Liger kernels are Triton kernels for CUDA"
    return None


def ours_liger(work: Work, clock: StepClock) -> list[torch.Tensor]:
    """Ours with Liger's RMSNorm, SwiGLU and RoPE patched into the model and its fused linear
    cross-entropy (output head and loss in chunks, gradient computed in the forward) as the loss.

    Liger patches RoPE and the module classes in ``modeling_qwen2`` itself, so every model built
    afterwards would get them: the module's attributes are restored before returning.
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, apply_liger_kernel_to_qwen2
    from transformers.models.qwen2 import modeling_qwen2

    saved = dict(vars(modeling_qwen2))
    try:
        model = _model(work, _our_attn(work))
        apply_liger_kernel_to_qwen2(
            rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False, model=causal_lm(model)
        )
        fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def loss_sum(model: nn.Module, batch: VarlenBatch) -> torch.Tensor:
            hidden_TD = forward_hidden(model, batch)[0]
            with autocast_for(hidden_TD.device):
                # Same pairing as train.loss: position t predicts labels[t + 1].
                return fused(output_head(model).weight, hidden_TD[:-1], batch.labels[0, 1:])

        return _ours_loop(work, clock, model, loss_sum)
    finally:
        for name, value in saved.items():
            setattr(modeling_qwen2, name, value)


# --- Hugging Face and TRL ------------------------------------------------------------------------------


def _documents(rows: list[PackedRow]) -> list[dict]:
    """Each document segment of ``rows`` as a collator feature (labels as stored: -100 at its start)."""
    features = []
    for row in rows:
        bounds = row.cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            features.append({"input_ids": row.input_ids[a:b].tolist(), "labels": row.labels[a:b].tolist()})
    return features


def hf_attention(kind: str, device: torch.device) -> str:
    """The ``attn_implementation`` of an HF contender. ``varlen`` is PyTorch's varlen flash kernel fed
    with the collator's ``cu_seq_lens`` (what ``flash_attention_2`` does with the flash-attn package);
    on the CPU our per-document sdpa reference stands in for it."""
    if kind == "varlen":
        return implementation_name("torch_varlen" if device.type == "cuda" else "sdpa", device)
    return kind


def _hf_model(work: Work, attn_kind: str) -> nn.Module:
    model = _model(work, _our_attn(work))
    causal_lm(model).set_attn_implementation(hf_attention(attn_kind, work.device))
    # Users get peft's default, which casts each adapter input to fp32; ours turns that off.
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = True
    return model


def _flatten(features: list[dict], attn_kind: str) -> dict:
    from transformers import DataCollatorWithFlattening

    # The flash kwargs (cu_seq_lens) are what the flash path reads; sdpa builds its mask from position_ids.
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=attn_kind != "sdpa", return_tensors="pt")
    return collator(features)


def hf_missing(attn_kind: str) -> str | None:
    if attn_kind == "flash_attention_2":
        if not torch.cuda.is_available():
            return "flash_attention_2 needs CUDA"
        if not flash_attn_available():
            return "the flash-attn package is not installed (flash_attention_2 needs it)"
    return None


def hf_flatten(work: Work, clock: StepClock, attn_kind: str) -> list[torch.Tensor]:
    model = _hf_model(work, attn_kind)
    batches = []
    for rows in work.micro_batches:
        collated = _flatten(_documents(rows), attn_kind)
        batches.append({k: v.to(work.device) if torch.is_tensor(v) else v for k, v in collated.items()})

    def mean_loss(batch: dict) -> torch.Tensor:
        with autocast_for(work.device):
            return model(**batch, use_cache=False).loss

    return _steps(model, work.lr, batches, mean_loss, clock)


def _trainer_args(work: Work, out: str, rows_per_step: int) -> dict:
    on_cuda = work.device.type == "cuda"
    return dict(
        output_dir=out,
        max_steps=work.num_steps,
        per_device_train_batch_size=rows_per_step,
        learning_rate=work.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=on_cuda,
        use_cpu=not on_cuda,
        gradient_checkpointing=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=work.seed,
    )


def _recording(base: type, losses: list, clock: StepClock) -> type:
    """``base`` (Trainer or SFTTrainer) that reads its batches in order and records each step's loss."""
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(state.global_step - 1)

    class Recording(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, callbacks=[Clock()], **kwargs)

        def _get_train_sampler(self, *args, **kwargs):
            # The default shuffles; the losses are compared step by step on the same micro-batches.
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            losses.append((out[0] if return_outputs else out).detach())
            return out

    return Recording


def _rows_per_step(work: Work) -> int:
    sizes = {len(rows) for rows in work.micro_batches}
    assert len(sizes) == 1, f"every micro-batch must hold the same number of rows, not {sizes}"
    return sizes.pop()


def hf_trainer(work: Work, clock: StepClock, attn_kind: str) -> list[torch.Tensor]:
    """``transformers.Trainer``: one dataset item per packed row, ``per_device_train_batch_size`` rows per
    step; its collator flattens the rows' documents with ``DataCollatorWithFlattening``."""
    from transformers import Trainer, TrainingArguments

    model = _hf_model(work, attn_kind)
    items = [{"documents": _documents([row])} for rows in work.micro_batches for row in rows]
    losses: list[torch.Tensor] = []
    with tempfile.TemporaryDirectory() as out:
        trainer = _recording(Trainer, losses, clock)(
            model=model,
            args=TrainingArguments(**_trainer_args(work, out, _rows_per_step(work))),
            train_dataset=items,
            data_collator=lambda batch: _flatten([d for item in batch for d in item["documents"]], attn_kind),
        )
        trainer.train()
    return losses


def trainer_missing() -> str | None:
    return (
        None if importlib.util.find_spec("accelerate") else "accelerate is not installed (Trainer needs it)"
    )


def trl_missing() -> str | None:
    return trainer_missing() or (None if importlib.util.find_spec("trl") else "trl is not installed")


def trl_sft(work: Work, clock: StepClock, attn_kind: str) -> list[torch.Tensor]:
    """``trl.SFTTrainer(padding_free=True)``: each packed row with its documents' ``seq_lengths``, as
    TRL's BFD packing writes them; TRL's collator derives position_ids, labels and cu_seq_lens."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    model = _hf_model(work, attn_kind)
    rows = [row for rows in work.micro_batches for row in rows]
    dataset = Dataset.from_list(
        [
            {
                "input_ids": row.input_ids.tolist(),
                "seq_lengths": (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).tolist(),
            }
            for row in rows
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(work.tokenizer_file), eos_token=work.eos_token, pad_token=work.eos_token
    )
    losses: list[torch.Tensor] = []
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            **_trainer_args(work, out, _rows_per_step(work)),
            padding_free=True,
            packing=False,
            max_length=None,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        trainer = _recording(SFTTrainer, losses, clock)(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
    return losses
