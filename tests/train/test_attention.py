"""Varlen attention: the reference matches a block-diagonal mask, the model isolates documents, and refuses
to run without boundaries. Every isolation test has a negative control (the naive packed forward)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.attention import (
    AttentionSetupError,
    one_sequence_attention,
    reference_varlen,
    resolve_attn,
    varlen_kwargs,
)
from train.model import (
    LoraSettings,
    ModelError,
    causal_lm,
    forward_hidden,
    forward_hidden_naive,
    input_embeddings,
    load_model,
    output_head,
)

from .segments import make_batch, segment

VOCAB = 500
LENGTHS = [7, 12, 5, 9]


# Packed-vs-alone equalities are checked in float64: the two forwards run kernels picked by shape, whose
# float32 round-off differs between CPUs and is the size of any float32 tolerance. In float64 it is
# about 1e-15 relative, far below TOLERANCE; a leak between documents is far above it.
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa")


@pytest.fixture(scope="module")
def model64():
    return load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", dtype=torch.float64)


def _masked_attention(q, k, v, mask, scale):
    """Attention written out with an explicit [T, T] boolean mask (independent of reference_varlen)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def test_reference_matches_block_diagonal_mask_with_gqa():
    torch.manual_seed(0)
    num_tokens, num_heads, num_kv_heads, head_dim = sum(LENGTHS), 4, 2, 8
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=torch.float64)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=torch.float64)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=torch.float64)
    cu = make_batch(LENGTHS, VOCAB).cu_seqlens
    doc = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    block_diagonal = causal & (doc[:, None] == doc[None, :])
    out = reference_varlen(q, k, v, cu, head_dim**-0.5)
    expected = _masked_attention(q, k, v, block_diagonal, head_dim**-0.5)
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=TOLERANCE)
    # negative control: a causal mask over the whole row gives other outputs after the first segment
    leaky = _masked_attention(q, k, v, causal, head_dim**-0.5)
    assert (out[LENGTHS[0] :] - leaky[LENGTHS[0] :]).abs().max() > 1e-2


def test_reference_rejects_boundaries_that_do_not_cover_the_row():
    q = torch.randn(10, 2, 4)
    with pytest.raises(AttentionSetupError, match="cu_seqlens"):
        reference_varlen(q, q, q, torch.tensor([0, 4, 8], dtype=torch.int32), 0.5)


def test_resolve_attn():
    assert resolve_attn("auto", "cpu") == "sdpa"
    assert resolve_attn("sdpa", "cpu") == "sdpa"
    with pytest.raises(AttentionSetupError, match="CUDA"):
        resolve_attn("torch_varlen", "cpu")
    with pytest.raises(AttentionSetupError, match="unknown"):
        resolve_attn("eager", "cpu")


@torch.no_grad()
def test_packed_logits_equal_each_document_alone(model64):
    model = model64
    batch = make_batch(LENGTHS, VOCAB)
    head = output_head(model)
    packed = head(forward_hidden(model, batch))[0]
    naive = head(forward_hidden_naive(model, batch))[0]
    naive_diff = 0.0
    for i in range(len(LENGTHS)):
        start, end = batch.cu_seqlens[i].item(), batch.cu_seqlens[i + 1].item()
        alone = head(forward_hidden(model, segment(batch, i)))[0]
        torch.testing.assert_close(packed[start:end], alone, atol=TOLERANCE, rtol=TOLERANCE)
        naive_diff = max(naive_diff, (naive[start:end] - alone).abs().max().item())
    # negative control: the plain causal mask over the row lets later documents see earlier ones
    assert naive_diff > 0.1


def _cross_document_gradient(model, batch, forward) -> tuple[float, float]:
    """Largest |d loss(last document) / d embeddings| on the other documents, and on its own tokens."""
    embeds = input_embeddings(model)(batch.input_ids).detach().requires_grad_(True)
    hidden = forward(model, batch, inputs_embeds=embeds)
    last = batch.cu_seqlens[-2].item()
    logits = output_head(model)(hidden[0, last:])
    loss = torch.nn.functional.cross_entropy(logits[:-1], batch.input_ids[0, last + 1 :])
    (grad,) = torch.autograd.grad(loss, embeds)
    return grad[0, :last].abs().max().item(), grad[0, last:].abs().max().item()


def test_no_gradient_flows_between_documents(model):
    batch = make_batch(LENGTHS, VOCAB, seed=1)
    other, own = _cross_document_gradient(model, batch, forward_hidden)
    assert other == 0.0  # exactly zero, not merely small
    assert own > 0.0
    # negative control: the naive forward sends gradient into the earlier documents
    other_naive, _ = _cross_document_gradient(model, batch, forward_hidden_naive)
    assert other_naive > 1e-4


def test_forward_without_boundaries_is_refused(model):
    batch = make_batch(LENGTHS, VOCAB)
    with pytest.raises(AttentionSetupError, match="cu_seq_lens_q"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids)


def test_forward_with_a_mask_is_refused(model):
    batch = make_batch(LENGTHS, VOCAB)
    num_tokens = batch.num_tokens
    mask = torch.zeros(1, 1, num_tokens, num_tokens)  # a 4D additive mask: transformers passes it through
    with pytest.raises(AttentionSetupError, match="mask"):
        model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids,
            **varlen_kwargs(batch.cu_seqlens, batch.max_seqlen),
        )


@torch.no_grad()
def test_one_sequence_without_boundaries_runs_plain_causal_attention(model64):
    """The generation rule: one unpacked sequence (no cu_seqlens, no cache) computes what the varlen
    forward computes for it, with or without an all-ones 2D mask (which says nothing)."""
    one = segment(make_batch(LENGTHS, VOCAB, seed=2), 1)
    expected = forward_hidden(model64, one)
    decoder = model64.get_decoder()
    got = decoder(input_ids=one.input_ids, position_ids=one.position_ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
    ones = torch.ones_like(one.input_ids)
    got = decoder(input_ids=one.input_ids, attention_mask=ones).last_hidden_state
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_one_sequence_attention_after_a_cache_is_causal_from_the_last_key():
    """A chunk of queries after cached keys (q < k) equals the last rows of the whole sequence's attention."""
    torch.manual_seed(0)
    num_tokens, num_queries = 11, 4
    q = torch.randn(1, 4, num_tokens, 8, dtype=torch.float64)
    k = torch.randn(1, 2, num_tokens, 8, dtype=torch.float64)
    v = torch.randn(1, 2, num_tokens, 8, dtype=torch.float64)
    whole = one_sequence_attention(q, k, v, 8**-0.5)
    for n in (num_queries, 1):
        chunk = one_sequence_attention(q[:, :, -n:], k, v, 8**-0.5)
        torch.testing.assert_close(chunk, whole[:, -n:], atol=TOLERANCE, rtol=TOLERANCE)
    # negative control: top-left causal alignment (SDPA's is_causal for q < k) gives other rows
    wrong = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, -num_queries:], k, v, is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert (wrong - whole[:, -num_queries:]).abs().max() > 1e-2


def test_forwards_without_boundaries_that_could_leak_are_refused(model):
    batch = make_batch(LENGTHS, VOCAB)
    # a packed row with an all-ones 2D mask: its position ids still restart
    with pytest.raises(AttentionSetupError, match="packed row"):
        model(
            input_ids=batch.input_ids,
            attention_mask=torch.ones_like(batch.input_ids),
            position_ids=batch.position_ids,
        )
    # several rows without boundaries
    two_rows = batch.input_ids[:, :10].repeat(2, 1)
    with pytest.raises(AttentionSetupError, match="batch of 2 rows"):
        model(input_ids=two_rows)
    # a padding mask never reaches attention (no mask is built for our names): the decoder's hook refuses it
    padded = torch.ones(1, 10, dtype=torch.long)
    padded[0, :3] = 0
    with pytest.raises(AttentionSetupError, match="padding mask"):
        model(input_ids=batch.input_ids[:, :10], attention_mask=padded)
    with pytest.raises(AttentionSetupError, match="padding mask"):
        model.generate(input_ids=batch.input_ids[:, :10], attention_mask=padded, max_new_tokens=2)


def test_a_model_switched_back_to_transformers_sdpa_takes_its_padding_mask():
    """The padding-mask refusal guards our attention only: the benchmark's padded baseline sets the
    model back to transformers' own sdpa, which applies the mask, and must run."""
    lm = causal_lm(load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", seed=1))
    lm.eval()
    ids = make_batch(LENGTHS, VOCAB).input_ids[:, :10]
    padded = torch.ones(1, 10, dtype=torch.long)
    padded[0, :3] = 0
    with pytest.raises(AttentionSetupError, match="padding mask"):
        lm(input_ids=ids, attention_mask=padded)
    lm.set_attn_implementation("sdpa")
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=padded).logits
    assert torch.isfinite(logits[0, 3:]).all()


def test_tiny_model_is_deterministic_and_lora_trains_only_the_adapter():
    a = load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", seed=3)
    b = load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", seed=3)
    c = load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(input_embeddings(a).weight, input_embeddings(c).weight)
    lora = load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", lora=LoraSettings(r=4, alpha=8)).double()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".")[-4] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        batch = make_batch(LENGTHS, VOCAB)
        packed = forward_hidden(lora, batch)[0]
        alone = forward_hidden(lora, segment(batch, 1))[0]
    torch.testing.assert_close(
        packed[LENGTHS[0] : LENGTHS[0] + LENGTHS[1]], alone, atol=TOLERANCE, rtol=TOLERANCE
    )


def test_llama_folder_loads_and_isolates(tmp_path):
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_model(
        str(tmp_path),
        vocab_size=VOCAB,
        attn="auto",
        device="cpu",
        lora=LoraSettings(r=2),
        dtype=torch.float64,
    )
    batch = make_batch(LENGTHS, VOCAB)
    with torch.no_grad():
        packed = forward_hidden(model, batch)[0]
        alone = forward_hidden(model, segment(batch, 2))[0]
        naive = forward_hidden_naive(model, batch)[0]
    start, end = batch.cu_seqlens[2].item(), batch.cu_seqlens[3].item()
    torch.testing.assert_close(packed[start:end], alone, atol=TOLERANCE, rtol=TOLERANCE)
    assert (naive[start:end] - alone).abs().max() > 1e-3


def test_model_errors_say_what_to_fix(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        load_model(str(tmp_path / "nope"), vocab_size=VOCAB, attn="sdpa")
    config = LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(ModelError, match="do not belong together"):
        load_model(str(tmp_path), vocab_size=VOCAB, attn="sdpa")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_backends_match_the_reference(backend):
    from train.attention import flash_attn_available

    if backend == "flash_attn" and not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    fast = load_model("tiny-qwen2", vocab_size=VOCAB, attn=backend, device="cuda")
    ref = load_model("tiny-qwen2", vocab_size=VOCAB, attn="sdpa", device="cuda")
    batch = make_batch(LENGTHS, VOCAB).to("cuda")
    with torch.no_grad():
        diff = (forward_hidden(fast, batch) - forward_hidden(ref, batch)).abs().max().item()
    assert diff < 5e-2


# The CUDA backends cannot run here. Their plumbing (layouts, dtypes, GQA, the causal flag across torch's
# varlen_attn signatures) is checked with stand-in kernels that compute the reference's result only when
# called exactly as the real kernel's contract requires.


def _varlen_attn_2_13(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    assert tuple(window_size) == (-1, 0), "not causal"
    assert enable_gqa == (query.shape[1] != key.shape[1])
    assert query.is_contiguous() and query.dtype in (torch.bfloat16, torch.float16)
    assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    return reference_varlen(query, key, value, cu_seq_q, scale)


def _varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal
    assert query.shape[1] == key.shape[1], "2.10 has no GQA: heads must have been repeated"
    return reference_varlen(query, key, value, cu_seq_q, query.shape[-1] ** -0.5)


@pytest.mark.parametrize("fake", [_varlen_attn_2_13, _varlen_attn_2_10])
def test_torch_varlen_plumbing_with_a_stand_in_kernel(model, monkeypatch, fake):
    import torch.nn.attention.varlen as varlen_module

    from train import attention

    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", [])  # the signature is read again, the fake's
    _check_backend_matches_reference(model, attention.IMPLEMENTATION_NAMES["torch_varlen"])


def test_flash_attn_plumbing_with_a_stand_in_kernel(model, monkeypatch):
    import sys
    import types

    from train import attention

    def flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False
    ):
        assert causal and q.is_contiguous() and q.dtype == torch.bfloat16 and cu_q.dtype == torch.int32
        return reference_varlen(q, k, v, cu_q, softmax_scale)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)
    )
    _check_backend_matches_reference(model, attention.IMPLEMENTATION_NAMES["flash_attn"])


def _check_backend_matches_reference(model, implementation: str) -> None:
    from train.model import causal_lm

    batch = make_batch(LENGTHS, VOCAB, seed=4)
    base = causal_lm(model)
    reference_name = base.config._attn_implementation
    with torch.no_grad():
        expected = forward_hidden(model, batch)
        base.set_attn_implementation(implementation)
        try:
            got = forward_hidden(model, batch)
        finally:
            base.set_attn_implementation(reference_name)
    # the stand-ins run in bf16, as the real kernels do
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
