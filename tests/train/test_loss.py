"""The summed, chunked loss: equal to full-logits cross-entropy, additive over documents, never [T, V] logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from shared.contract import IGNORE_INDEX
from train.batch import VarlenBatch
from train.loss import chunked_cross_entropy_sum, micro_batch_loss_sum
from train.model import forward_hidden_naive, load_model, output_head

from .segments import make_batch, segment

VOCAB = 500
LENGTHS = [9, 14, 6, 11]


# Equalities below are checked in float64: a packed and an unpacked forward, or a chunked and a full
# loss, sum the same terms in another order (kernels are picked by shape, and differ between CPUs), so
# in float32 their round-off is the size of any tolerance one could set. In float64 it is about 1e-15
# relative, far below TOLERANCE; a real bug (a token lost at a chunk edge, a leak) is far above it.
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", dtype=torch.float64)


def _full_logits_loss(hidden_TD, head, labels_T):
    """The textbook computation: all logits at once, Hugging Face shift, summed."""
    logits = head(hidden_TD)
    return F.cross_entropy(logits[:-1], labels_T[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def _problem(num_tokens=50, dim=16, vocab=300, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=gen, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(dim, vocab, bias=False, dtype=dtype)
    torch.nn.init.normal_(head.weight, generator=gen)
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    labels[torch.tensor([0, 13, 30])] = IGNORE_INDEX
    return hidden, head, labels


def _assert_chunked_equals_full(chunk_tokens):
    hidden, head, labels = _problem()
    expected = _full_logits_loss(hidden, head, labels)
    expected_grads = torch.autograd.grad(expected, (hidden, head.weight))
    loss, num_targets = chunked_cross_entropy_sum(hidden, head, labels, chunk_tokens=chunk_tokens)
    grads = torch.autograd.grad(loss, (hidden, head.weight))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=TOLERANCE, atol=0.0)
    for got, want in zip(grads, expected_grads, strict=True):
        # atol scaled by the largest entry: a gradient entry near zero is a sum of terms of that size
        torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE * want.abs().max().item())
    assert num_targets.item() == int((labels[1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("chunk_tokens", [1, 7, 49, 1000])
def test_chunked_loss_and_gradients_equal_full_logits(chunk_tokens):
    _assert_chunked_equals_full(chunk_tokens)


@pytest.mark.parametrize("broken", ["last position of each chunk dropped", "targets shifted by one"])
def test_the_equality_check_catches_an_off_by_one(monkeypatch, broken):
    """Negative control: the float64 comparison above fails on a chunked loss that is wrong by one token."""
    import train.loss

    exact = train.loss._chunk_loss_sum

    def off_by_one(head, hidden_ND, targets_N):
        if broken == "targets shifted by one":
            targets_N = torch.roll(targets_N, 1)
        else:
            hidden_ND, targets_N = hidden_ND[:-1], targets_N[:-1]
        return exact(head, hidden_ND, targets_N)

    monkeypatch.setattr(train.loss, "_chunk_loss_sum", off_by_one)
    with pytest.raises(AssertionError):
        _assert_chunked_equals_full(7)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_loss_never_materialises_full_logits():
    num_tokens, dim, vocab, chunk = 400, 16, 300, 32
    hidden, head, labels = _problem(num_tokens, dim, vocab)
    with _LargestTensor() as chunked:
        loss, _ = chunked_cross_entropy_sum(hidden, head, labels, chunk_tokens=chunk)
        loss.backward()
    # Largest allowed: one chunk of logits, or the head's weight and its gradient.
    assert chunked.largest <= max(chunk * vocab, vocab * dim)
    # negative control: the full computation does produce a [T, V] tensor, and the probe sees it
    with _LargestTensor() as full:
        _full_logits_loss(hidden, head, labels).backward()
    assert full.largest >= (num_tokens - 1) * vocab


def test_packed_loss_is_the_sum_of_each_document_alone(model):
    batch = make_batch(LENGTHS, VOCAB, seed=2)
    with torch.no_grad():
        packed = micro_batch_loss_sum(model, batch).item()
        alone = sum(micro_batch_loss_sum(model, segment(batch, i)).item() for i in range(len(LENGTHS)))
        hidden = forward_hidden_naive(model, batch)
        naive, _ = chunked_cross_entropy_sum(hidden, output_head(model), batch.labels)
    assert abs(packed - alone) / abs(alone) <= TOLERANCE
    # negative control: the naive forward (no boundaries) changes the loss
    assert abs(naive.item() - alone) / abs(alone) > 1e-3


def test_first_label_of_a_segment_keeps_the_loss_additive(model):
    """The contract's -100 at each segment start is what stops the EOS predicting the next document."""
    batch = make_batch(LENGTHS, VOCAB, seed=3)
    labels = batch.labels.clone()
    labels[0, batch.cu_seqlens[1]] = batch.input_ids[0, batch.cu_seqlens[1]]  # break the contract
    broken = VarlenBatch(
        input_ids=batch.input_ids,
        labels=labels,
        position_ids=batch.position_ids,
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
        num_target_tokens=batch.num_target_tokens + 1,
    )
    with torch.no_grad():
        alone = sum(micro_batch_loss_sum(model, segment(batch, i)).item() for i in range(len(LENGTHS)))
        assert abs(micro_batch_loss_sum(model, batch).item() - alone) / alone <= TOLERANCE
        assert abs(micro_batch_loss_sum(model, broken).item() - alone) / alone > 1e-3


def test_micro_batch_loss_backpropagates_into_lora_only():
    from train.model import LoraSettings

    lora = load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", lora=LoraSettings(r=4, alpha=8))
    batch = make_batch(LENGTHS, VOCAB)
    loss = micro_batch_loss_sum(lora, batch)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (loss / batch.num_target_tokens).backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    # lora_B starts at zero, so at step 0 only lora_B receives a gradient (lora_A's is B^T-weighted)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_skipping_adapter_input_casts_changes_nothing_under_autocast():
    """A bf16 base with fp32 adapters (the GPU LoRA setup), run under bf16 autocast as on a GPU:
    peft's cast of each adapter input to fp32, which we turn off, must not change loss or gradients."""
    from train.model import LoraSettings, model_from_config, tiny_qwen2_config

    batch = make_batch([30, 50], vocab_size=256)
    results = []
    for cast in (True, False):
        model = model_from_config(
            tiny_qwen2_config(256), attn="sdpa", lora=LoraSettings(), dtype=torch.bfloat16, seed=0
        )
        layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert layers and all(not m.cast_input_dtype_enabled for m in layers)  # what load_model does
        adapters = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in adapters)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # lora_B starts at zero; give both adapter matrices a gradient path
            for p in adapters:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for m in layers:
            m.cast_input_dtype_enabled = cast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = micro_batch_loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in adapters]))
    (loss_on, grads_on), (loss_off, grads_off) = results
    assert torch.equal(loss_on, loss_off)
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off, strict=True))
    assert any(g.abs().sum() > 0 for g in grads_off)
