"""The summed, chunked loss: fused and checkpointed both equal to full-logits cross-entropy (loss and
gradients), additive over documents, never [T, V] logits; the fused one with fewer matmuls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import train.loss
from shared.contract import IGNORE_INDEX
from train.batch import VarlenBatch
from train.loss import (
    can_fuse,
    checkpointed_cross_entropy_sum,
    chunked_cross_entropy_sum,
    fused_cross_entropy_sum,
    micro_batch_loss_sum,
)
from train.model import forward_hidden_naive, load_model, output_head

from .segments import make_batch, segment

VOCAB = 500
LENGTHS = [9, 14, 6, 11]


# Equalities below are checked in float64: a packed and an unpacked forward, or a chunked and a full
# loss, sum the same terms in another order (kernels are picked by shape, and differ between CPUs), so
# in float32 their round-off is the size of any tolerance one could set. In float64 it is about 1e-15
# relative, far below TOLERANCE; a real bug (a token lost at a chunk edge, a leak) is far above it.
TOLERANCE = 1e-9
BF16_EPS = 2.0**-8
"""bf16's relative spacing: under bf16 autocast both paths round the same logits and grads to it."""
IMPLEMENTATIONS = {"fused": fused_cross_entropy_sum, "checkpointed": checkpointed_cross_entropy_sum}


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", dtype=torch.float64)


EXACT = 1e-12
"""Loss-level comparisons in float64 (one head, no decoder): the round-off is ~1e-15 relative."""


def _full_logits_loss(hidden_TD, head, labels_T):
    """The textbook computation: all logits at once (upcast, as bf16 ones would be), Hugging Face shift,
    summed."""
    logits = head(hidden_TD)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits[:-1], labels_T[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def _problem(num_tokens=50, dim=16, vocab=300, seed=0, dtype=torch.float64, bias=False, ignored=(0, 13, 30)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=gen, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(dim, vocab, bias=bias, dtype=dtype)
    torch.nn.init.normal_(head.weight, generator=gen)
    if bias:
        torch.nn.init.normal_(head.bias, generator=gen)
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    labels[list(ignored)] = IGNORE_INDEX
    return hidden, head, labels


def assert_close_scaled(got, want, tolerance=EXACT):
    """Relative ``tolerance``, and an absolute one scaled by the largest entry: a gradient entry near
    zero is a sum of terms of that size."""
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def _loss_and_grads(loss_fn, hidden, head, labels, scale=1.0):
    """``loss_fn``'s loss, and the gradients of ``loss * scale`` wrt the hidden states and every trainable
    head parameter, by ``backward()`` (so that tied uses accumulate as in training)."""
    inputs = [hidden, *(p for p in head.parameters() if p.requires_grad)]
    for x in inputs:
        x.grad = None
    loss = loss_fn(hidden, head, labels)
    (loss * scale).backward()
    grads = [x.grad for x in inputs]
    for x in inputs:
        x.grad = None
    return loss.detach(), grads


def _assert_equals_full(impl, hidden, head, labels, chunk_tokens, *, scale=1.0, tolerance=EXACT):
    """``impl``'s loss and gradients equal the full-logits ones."""
    want_loss, want_grads = _loss_and_grads(_full_logits_loss, hidden, head, labels, scale)
    chunked = lambda h, m, lab: impl(h, m, lab, chunk_tokens=chunk_tokens)[0]  # noqa: E731
    loss, grads = _loss_and_grads(chunked, hidden, head, labels, scale)
    assert loss.dtype == want_loss.dtype
    assert_close_scaled(loss, want_loss, tolerance)
    for got, want in zip(grads, want_grads, strict=True):
        assert got is not None and got.dtype == want.dtype
        assert_close_scaled(got, want, tolerance)
    return loss, grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 8, 49, 1000])
def test_fused_and_checkpointed_equal_full_logits(chunk_tokens, bias):
    """Chunks that do (7) and do not (8) divide N = 49, one position per chunk, one chunk for all (49,
    1000); with a bias;
    the head trainable, so the weight's gradient is checked too; a non-unit incoming gradient."""
    hidden, head, labels = _problem(bias=bias)
    results = {
        name: _assert_equals_full(impl, hidden, head, labels, chunk_tokens, scale=-2.5)
        for name, impl in IMPLEMENTATIONS.items()
    }
    (fused_loss, fused_grads), (ref_loss, ref_grads) = results["fused"], results["checkpointed"]
    assert_close_scaled(fused_loss, ref_loss)
    for got, want in zip(fused_grads, ref_grads, strict=True):
        assert_close_scaled(got, want)
    _, num_targets = fused_cross_entropy_sum(hidden, head, labels, chunk_tokens=chunk_tokens)
    assert num_targets.item() == int((labels[1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "case", ["one position", "no position", "an all-ignored chunk", "all ignored", "frozen head"]
)
def test_edge_cases_equal_full_logits(impl, case):
    ignored = {"an all-ignored chunk": range(8, 24), "all ignored": range(50)}.get(case, (0, 13, 30))
    num_tokens = {"one position": 2, "no position": 1}.get(case, 50)
    hidden, head, labels = _problem(num_tokens=num_tokens, ignored=[i for i in ignored if i < num_tokens])
    if case == "frozen head":  # LoRA: the head is frozen, only the hidden states get a gradient
        head.requires_grad_(False)
    if case == "no position":  # one token predicts nothing: zero, still connected to the graph
        loss, _ = IMPLEMENTATIONS[impl](hidden, head, labels, chunk_tokens=8)
        loss.backward()
        assert loss.item() == 0.0 and hidden.grad is not None and not hidden.grad.any()
        return
    loss, grads = _assert_equals_full(IMPLEMENTATIONS[impl], hidden, head, labels, 8, scale=3.0)
    if case == "all ignored":
        assert loss.item() == 0.0 and not any(g.any() for g in grads)
    if case == "frozen head":
        assert len(grads) == 1 and head.weight.grad is None


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_tied_head_gradient_accumulates_both_uses(impl):
    """The head shares its weight with the input embedding: the weight's gradient is the embedding's
    plus the head's, as with full logits."""
    vocab, dim, num_tokens = 300, 16, 50
    gen = torch.Generator().manual_seed(5)
    embedding = torch.nn.Embedding(vocab, dim, dtype=torch.float64)
    head = torch.nn.Linear(dim, vocab, bias=False, dtype=torch.float64)
    head.weight = embedding.weight
    ids = torch.randint(0, vocab, (num_tokens,), generator=gen)
    labels = ids.clone()
    labels[0] = IGNORE_INDEX

    def grads(loss_fn):
        embedding.weight.grad = None
        loss_fn(torch.tanh(embedding(ids)), head, labels).backward()
        return embedding.weight.grad

    tied = grads(lambda h, m, lab: IMPLEMENTATIONS[impl](h, m, lab, chunk_tokens=7)[0])
    assert_close_scaled(tied, grads(_full_logits_loss))
    # negative control: the head's use alone differs (the embedding's share is not zero)
    head_only = grads(lambda h, m, lab: IMPLEMENTATIONS[impl](h.detach(), m, lab, chunk_tokens=7)[0])
    assert (tied - head_only).abs().max() > 1e-3 * tied.abs().max()


def _broken_gradient(monkeypatch, broken):
    """Break the fused path on purpose: its gradient leaves the onehot out, or its targets are shifted."""
    exact = train.loss._softmax_minus_onehot

    def wrong(logits_nV, targets_n):
        if broken == "targets shifted by one":
            return exact(logits_nV, torch.roll(targets_n, 1))
        loss = exact(logits_nV, targets_n)
        valid_n1 = (targets_n != IGNORE_INDEX).to(logits_nV.dtype).unsqueeze(1)
        safe_n1 = torch.where(targets_n != IGNORE_INDEX, targets_n, 0).unsqueeze(1)
        logits_nV.scatter_add_(1, safe_n1, valid_n1)  # undo the onehot: softmax alone
        return loss

    monkeypatch.setattr(train.loss, "_softmax_minus_onehot", wrong)


@pytest.mark.parametrize("broken", ["onehot left out of the gradient", "targets shifted by one"])
def test_the_equality_check_catches_a_wrong_fused_gradient(monkeypatch, broken):
    """Negative control: the comparison above fails on a fused loss that is wrong (its loss still right
    in the first case: only the gradient is)."""
    hidden, head, labels = _problem()
    _broken_gradient(monkeypatch, broken)
    with pytest.raises(AssertionError):
        _assert_equals_full(fused_cross_entropy_sum, hidden, head, labels, 7)


@pytest.mark.parametrize("broken", ["last position of each chunk dropped", "targets shifted by one"])
def test_the_equality_check_catches_an_off_by_one(monkeypatch, broken):
    """Negative control: the float64 comparison above fails on a checkpointed loss wrong by one token."""
    exact = train.loss._chunk_loss_sum

    def off_by_one(head, hidden_ND, targets_N):
        if broken == "targets shifted by one":
            targets_N = torch.roll(targets_N, 1)
        else:
            hidden_ND, targets_N = hidden_ND[:-1], targets_N[:-1]
        return exact(head, hidden_ND, targets_N)

    monkeypatch.setattr(train.loss, "_chunk_loss_sum", off_by_one)
    hidden, head, labels = _problem()
    with pytest.raises(AssertionError):
        _assert_equals_full(checkpointed_cross_entropy_sum, hidden, head, labels, 7)


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_autocast_agrees_within_bf16_rounding(monkeypatch, bias):
    """fp32 weights under CPU bf16 autocast, as a GPU step runs: the matmuls in bf16, the softmax in fp32.
    Both paths round the same products to bf16, once per chunk where full logits round once in all, so
    they agree with full logits within a few bf16 steps of the values' scale; a wrong gradient is far
    outside that (negative control)."""
    hidden, head, labels = _problem(dtype=torch.float32, bias=bias)
    with torch.no_grad():
        head.weight.mul_(0.25)  # logits of a few units, as a trained head gives
    tolerance = 8 * BF16_EPS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for impl in IMPLEMENTATIONS.values():
            loss, grads = _assert_equals_full(impl, hidden, head, labels, 7, scale=0.5, tolerance=tolerance)
            assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
        _broken_gradient(monkeypatch, "onehot left out of the gradient")
        with pytest.raises(AssertionError):
            _assert_equals_full(fused_cross_entropy_sum, hidden, head, labels, 7, tolerance=tolerance)


class _CountMatmuls(TorchDispatchMode):
    """Counts the matrix products (mm, addmm) any op runs."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_runs_one_matmul_fewer_per_chunk(head_trains):
    """Per chunk: a frozen head (LoRA) costs the fused loss 2 matmuls against the reference's 3 (forward,
    recomputed forward, grad wrt hidden); a trainable one 3 against 4."""
    hidden, head, labels = _problem()
    head.requires_grad_(head_trains)
    num_chunks = 7  # 49 positions, 7 per chunk
    counts = {}
    for name, impl in IMPLEMENTATIONS.items():
        with _CountMatmuls() as counter:
            loss, _ = impl(hidden, head, labels, chunk_tokens=7)
            loss.backward()
        counts[name] = counter.count
    assert counts == {"fused": (2 + head_trains) * num_chunks, "checkpointed": (3 + head_trains) * num_chunks}
    with _CountMatmuls() as counter:  # and the dispatcher picks the fused path for a plain nn.Linear
        chunked_cross_entropy_sum(hidden, head, labels, chunk_tokens=7)[0].backward()
    assert counter.count == counts["fused"]


def test_no_grad_computes_the_loss_alone():
    """Eval: under torch.no_grad() one matmul per chunk, no gradient work, the same loss."""
    hidden, head, labels = _problem()
    with torch.no_grad(), _CountMatmuls() as counter:
        loss, _ = fused_cross_entropy_sum(hidden, head, labels, chunk_tokens=7)
    assert counter.count == 7 and not loss.requires_grad
    with torch.no_grad():
        assert_close_scaled(loss, _full_logits_loss(hidden, head, labels))


def test_only_a_plain_linear_head_is_fused():
    """What cannot be proven equal goes to the checkpointed reference: a LoRA-wrapped head, a subclass,
    a hooked head, mixed dtypes without autocast. A LoRA head there still equals full logits."""
    from peft import LoraConfig, get_peft_model

    hidden, head, labels = _problem()
    assert can_fuse(hidden, head)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert not can_fuse(hidden, Scaled(16, 300, dtype=torch.float64))
    hooked = torch.nn.Linear(16, 300, dtype=torch.float64)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert not can_fuse(hidden, hooked)
    assert not can_fuse(hidden, torch.nn.Linear(16, 300, dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast fp32 and bf16 mix as in linear
        assert can_fuse(hidden.float(), torch.nn.Linear(16, 300, dtype=torch.bfloat16))

    wrapped = get_peft_model(
        torch.nn.Sequential(head),
        LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False),
    )
    lora_head = wrapped.base_model.model[0]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # seeded adapter weights, so that the LoRA head differs from the base one
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.normal_(0, 1, generator=gen)
    assert not can_fuse(hidden, lora_head)
    want = _full_logits_loss(hidden, lora_head, labels)
    got, _ = chunked_cross_entropy_sum(hidden, lora_head, labels, chunk_tokens=7)
    assert_close_scaled(got, want)
    # negative control: the LoRA head's loss is not the base head's
    assert (want - _full_logits_loss(hidden, head, labels)).abs() > 1e-3 * want.abs()


def test_a_dtensor_head_is_not_fused():
    """FSDP2 keeps sharded parameters as DTensors between steps; such a head goes to the reference."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        hidden, head, labels = _problem()
        mesh = init_device_mesh("cpu", (1,))
        head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Replicate()]))
        assert not can_fuse(hidden, head)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_chunked_loss_never_materialises_full_logits(impl):
    num_tokens, dim, vocab, chunk = 400, 16, 300, 32
    hidden, head, labels = _problem(num_tokens, dim, vocab)
    with _LargestTensor() as chunked:
        loss, _ = IMPLEMENTATIONS[impl](hidden, head, labels, chunk_tokens=chunk)
        loss.backward()
    # Largest allowed: one chunk of logits, or the head's weight and its gradient.
    assert chunked.largest <= max(chunk * vocab, vocab * dim)
    # negative control: the full computation does produce a [T, V] tensor, and the probe sees it
    with _LargestTensor() as full:
        _full_logits_loss(hidden, head, labels).backward()
    assert full.largest >= (num_tokens - 1) * vocab


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


@pytest.mark.parametrize("lora", [True, False])
def test_a_training_step_is_the_same_fused_or_checkpointed(monkeypatch, lora):
    """The tiny Qwen2 (its head tied to the embedding) in float64, LoRA or full fine-tuning: the loss
    and every trainable gradient of ``micro_batch_loss_sum`` equal those with the fused path refused."""
    from train.model import LoraSettings

    batch = make_batch(LENGTHS, VOCAB, seed=4)
    settings = LoraSettings(r=4, alpha=8) if lora else None
    results = []
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(train.loss, "can_fuse", lambda hidden, head: False)
        net = load_model(
            "tiny-qwen2", vocab_size=VOCAB, attn="sdpa", lora=settings, dtype=torch.float64, seed=1
        )
        with torch.no_grad():  # lora_B starts at zero: give every adapter weight a gradient path
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        loss = micro_batch_loss_sum(net, batch)
        (loss / batch.num_target_tokens).backward()
        results.append((loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}))
    (fused_loss, fused_grads), (ref_loss, ref_grads) = results
    assert_close_scaled(fused_loss, ref_loss, TOLERANCE)
    assert fused_grads.keys() == ref_grads.keys() and all(g is not None for g in fused_grads.values())
    for name, grad in fused_grads.items():
        assert_close_scaled(grad, ref_grads[name], TOLERANCE)
    if not lora:  # the tied weight: the head's and the embedding's gradient in one
        assert any("embed_tokens" in name for name in fused_grads)


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
