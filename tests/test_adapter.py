"""The APT adapter: growth keeps the function, slicing and merging are exact, salience matches brute force."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import first_output, tiny_batch, tiny_model
from torch import nn

import aptune
from aptune.adapter import (
    APTLinear,
    adapter_importance,
    adapter_param_count,
    merge_adapters,
    rank_saliences,
    wrap_linear,
)
from aptune.compact import slice_linear
from aptune.distill import identity_transform


def make_adapter(
    in_f: int = 7, out_f: int = 5, rank: int = 3, seed: int = 0, dtype=torch.float32
) -> APTLinear:
    torch.manual_seed(seed)
    ad = APTLinear(nn.Linear(in_f, out_f, dtype=dtype), rank=rank)
    with torch.no_grad():
        ad.lora_B.normal_()  # a non-trivial adapter
    return ad


def test_init_and_flags():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    w, b = lin.weight, lin.bias
    ad = APTLinear(lin, rank=8)
    assert ad.weight is w and ad.bias is b and ad.base is lin
    assert not w.requires_grad and not b.requires_grad
    assert ad.lora_A.requires_grad and ad.lora_B.requires_grad
    assert ad.lora_A.shape == (8, 6) and ad.lora_B.shape == (4, 8)
    assert (ad.in_features, ad.out_features, ad.rank, ad.scale, ad.alpha) == (6, 4, 8, 2.0, 16.0)
    assert bool((ad.lora_B == 0).all())
    assert ad.lora_A.abs().max() <= 1 / math.sqrt(6)
    assert {n for n, p in ad.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    x = torch.randn(3, 6)
    assert torch.equal(ad(x), lin(x))  # B = 0: the adapter starts as a no-op
    assert adapter_param_count(ad) == 8 * 6 + 4 * 8


def test_forward_formula():
    ad = make_adapter()
    x = torch.randn(2, 4, 7)
    expected = x @ ad.weight.T + ad.bias + 2.0 * x @ (ad.lora_B @ ad.lora_A).T
    torch.testing.assert_close(ad(x), expected, atol=1e-5, rtol=0)


def dyadic(*shape: int, generator: torch.Generator, denom: int) -> torch.Tensor:
    """Small multiples of 1/denom: every product and sum below is exact in fp32, whatever the order."""
    return torch.randint(-8, 9, shape, generator=generator).float() / denom


@pytest.mark.parametrize("rank,new_rank", [(1, 2), (3, 8), (8, 16), (8, 13), (5, 64)])
def test_grow_keeps_outputs_exactly(rank, new_rank):
    """torch.equal after growth. Values are dyadic so that the check does not depend on the BLAS kernel's
    summation order, which changes with the matrix shape (see test_grow_random_values)."""
    g = torch.Generator().manual_seed(rank)
    ad = APTLinear(nn.Linear(24, 20), rank=rank)
    with torch.no_grad():
        ad.base.weight.copy_(dyadic(20, 24, generator=g, denom=8))
        ad.base.bias.copy_(dyadic(20, generator=g, denom=8))
        ad.lora_A.copy_(dyadic(rank, 24, generator=g, denom=16))
        ad.lora_B.copy_(dyadic(20, rank, generator=g, denom=4))
    x = dyadic(4, 6, 24, generator=g, denom=4)
    before = ad(x)
    old_A, old_B = ad.lora_A.detach().clone(), ad.lora_B.detach().clone()
    A, B = ad.grow(new_rank, generator=torch.Generator().manual_seed(3))
    assert A is ad.lora_A and B is ad.lora_B
    assert ad.rank == new_rank and ad.scale == 2.0 and ad.alpha == 2.0 * new_rank
    assert torch.equal(ad.lora_A[:rank], old_A) and torch.equal(ad.lora_B[:, :rank], old_B)
    assert bool((ad.lora_B[:, rank:] == 0).all())
    new_rows = ad.lora_A[rank:]
    assert new_rows.abs().max() <= 1 / math.sqrt(24) and new_rows.std() > 0
    assert A.requires_grad and B.requires_grad and not ad.weight.requires_grad
    assert torch.equal(ad(x), before)


@pytest.mark.parametrize("rank,new_rank", [(1, 2), (8, 16), (8, 13)])
def test_grow_random_values(rank, new_rank):
    """With arbitrary fp32 values the output can move by an ulp: the matmul kernel sums in a shape-dependent
    order. The function itself is unchanged."""
    ad = make_adapter(in_f=24, out_f=20, rank=rank)
    x = torch.randn(128, 24)
    before = ad(x)
    ad.grow(new_rank)
    torch.testing.assert_close(ad(x), before, atol=1e-5, rtol=1e-6)


def test_grow_bf16_and_errors():
    ad = make_adapter(in_f=16, out_f=12, rank=4, dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    before = ad(x)
    ad.grow(12)
    assert ad.lora_A.dtype == ad.lora_B.dtype == torch.float32  # fp32 factors on a bf16 base
    assert ad(x).dtype == torch.bfloat16
    torch.testing.assert_close(ad(x), before, atol=0, rtol=1e-2)
    A = ad.lora_A
    assert ad.grow(12)[0] is A  # same rank: nothing changes
    with pytest.raises(ValueError):
        ad.grow(11)


def test_merge_equals_adapter():
    ad = make_adapter()
    merged = ad.merge()
    assert type(merged) is nn.Linear
    x = torch.randn(5, 7)
    torch.testing.assert_close(merged(x), ad(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.weight, ad.weight + 2.0 * ad.lora_B @ ad.lora_A, atol=1e-6, rtol=0)
    assert merged.bias is not ad.bias and torch.equal(merged.bias, ad.bias)


@pytest.mark.parametrize("which", ["out", "in", "both"])
def test_slice_equals_sliced_merge(which):
    ad = make_adapter(in_f=9, out_f=8, rank=4)
    reference = ad.merge()
    out_idx = torch.tensor([0, 3, 4, 7]) if which in ("out", "both") else None
    in_idx = torch.tensor([1, 2, 5, 8, 6]) if which in ("in", "both") else None
    x = torch.randn(6, 9)
    x_in = x if in_idx is None else x[:, in_idx]
    slice_linear(ad, out_idx, in_idx)  # reaches APTLinear.aptune_slice
    slice_linear(reference, out_idx, in_idx)
    n_out, n_in = (8 if out_idx is None else 4), (9 if in_idx is None else 5)
    assert (ad.out_features, ad.in_features) == (n_out, n_in)
    assert ad.lora_A.shape == (4, n_in) and ad.lora_B.shape == (n_out, 4)
    assert ad.lora_A.requires_grad and ad.lora_B.requires_grad and not ad.weight.requires_grad
    assert not ad.bias.requires_grad
    torch.testing.assert_close(ad(x_in), reference(x_in), atol=1e-6, rtol=0)


def test_slice_matches_masked_input():
    """Dropping input channels equals zeroing them; dropping output rows equals selecting them."""
    ad = make_adapter(in_f=9, out_f=8, rank=4)
    keep_in, keep_out = torch.tensor([0, 2, 3, 7]), torch.tensor([1, 5, 6])
    x = torch.randn(4, 9)
    z = torch.zeros(9)
    z[keep_in] = 1
    expected = ad(x * z)[:, keep_out]
    ad.aptune_slice(keep_out, keep_in)
    torch.testing.assert_close(ad(x[:, keep_in]), expected, atol=1e-6, rtol=0)


def test_rank_salience_brute_force():
    ad = make_adapter(in_f=5, out_f=4, rank=3, seed=2)
    assert torch.equal(ad.rank_salience(), torch.zeros(3))
    x, target = torch.randn(6, 5), torch.randn(6, 4)
    loss = ((ad(x) - target) ** 2).sum()
    loss.backward()
    A, gA, B, gB = ad.lora_A, ad.lora_A.grad, ad.lora_B, ad.lora_B.grad
    expected = torch.zeros(3)
    from_B = torch.zeros(3)
    for k in range(3):
        expected[k] = abs(sum(A[k, j].item() * gA[k, j].item() for j in range(5)))
        from_B[k] = abs(sum(B[i, k].item() * gB[i, k].item() for i in range(4)))
    sal = ad.rank_salience()
    torch.testing.assert_close(sal, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sal, from_B, atol=1e-4, rtol=1e-4)  # same from A or B (spec §6.1)
    torch.testing.assert_close(adapter_importance(ad), expected.mean(), atol=1e-5, rtol=1e-5)
    assert sal.min() > 0


def test_rank_saliences_of_many_adapters_match_each_one():
    """The batched per-step computation (one product for all adapters, one reduction per input width) gives
    every adapter its own ranks' salience, in order, whatever the widths, ranks and missing gradients."""
    shapes = [(7, 5, 3), (9, 4, 2), (7, 6, 4), (9, 5, 1), (7, 3, 2)]  # (in, out, rank): two input widths
    adapters = [make_adapter(in_f=i, out_f=o, rank=r, seed=k) for k, (i, o, r) in enumerate(shapes)]
    for k, ad in enumerate(adapters):
        if k == 3:
            continue  # no gradient: zeros of its rank
        x = torch.randn(6, ad.base.in_features)
        (ad(x) ** 2).sum().backward()
    got = rank_saliences(adapters)
    assert [len(s) for s in got] == [r for _, _, r in shapes]
    for k, (ad, sal) in enumerate(zip(adapters, got, strict=True)):
        torch.testing.assert_close(sal, ad.rank_salience(), atol=0, rtol=1e-6)
        assert bool((sal > 0).all()) == (k != 3)


def test_wrap_and_merge_in_bert():
    model = tiny_model("BertForSequenceClassification")
    batch = tiny_batch()
    with torch.no_grad():
        dense = first_output(model(**batch))
    parent = model.bert.encoder.layer[0].attention.self
    ad = wrap_linear(parent, "query", rank=4)
    assert parent.query is ad and isinstance(ad, APTLinear)
    assert adapter_param_count(model) == 4 * 32 + 32 * 4
    with torch.no_grad():
        assert torch.equal(first_output(model(**batch)), dense)
        ad.lora_B.normal_()
        adapted = first_output(model(**batch))
    assert not torch.allclose(adapted, dense, atol=1e-3)
    with pytest.raises(ValueError):
        wrap_linear(parent, "query")
    assert merge_adapters(model) == 1
    assert type(parent.query) is nn.Linear
    assert not any(isinstance(m, APTLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(**batch)), adapted, atol=1e-5, rtol=0)


def _wrapped_bert(seed: int = 0) -> nn.Module:
    """A tiny BERT with adapters on q, v, FFN-up of every layer and on the pooler (a hidden producer)."""
    model = tiny_model("BertForSequenceClassification", seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in model.bert.encoder.layer:
        for parent, attr in [
            (layer.attention.self, "query"),
            (layer.attention.self, "value"),
            (layer.intermediate, "dense"),
        ]:
            ad = wrap_linear(parent, attr, rank=4)
            ad.grow(6)
            with torch.no_grad():
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.1)
    ad = wrap_linear(model.bert.pooler, "dense", rank=2)
    with torch.no_grad():
        ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.1)
    return model


def _binary_masks(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    masks = aptune.StructuralMasks.for_model(model)
    for i, m in enumerate(masks.heads):
        v = (torch.rand(len(m), generator=g) < 0.6).float()
        v[0] = 1.0
        masks.set_heads(i, v)
    for i, m in enumerate(masks.neurons):
        v = (torch.rand(len(m), generator=g) < 0.5).float()
        v[0] = 1.0
        masks.set_neurons(i, v)
    h = (torch.rand(len(masks.hidden), generator=g) < 0.75).float()
    h[:2] = 1.0
    masks.set_hidden(h)
    return masks


@pytest.mark.parametrize("seed", [0, 1])
def test_spec_masks_and_compaction_with_adapters(seed):
    model = _wrapped_bert(seed)
    batch = tiny_batch(seed)
    structure = aptune.describe(model)
    assert isinstance(structure.attention[0].q, APTLinear)
    assert structure.attention[0].num_heads == 4 and structure.ffn[0].num_neurons == 40
    reference = copy.deepcopy(model)
    merge_adapters(reference)
    shape_of = lambda m: aptune.StructureShape.of(aptune.describe(m))  # noqa: E731
    assert aptune.count_prunable(shape_of(model)) == aptune.count_prunable(shape_of(reference))

    masks = _binary_masks(model, seed)
    aptune.apply_masks(model, masks)
    with torch.no_grad():
        masked = first_output(model(**batch))
    aptune.apply_masks(reference, copy.deepcopy(masks))
    with torch.no_grad():
        torch.testing.assert_close(first_output(reference(**batch)), masked, atol=1e-5, rtol=0)

    aptune.compact(model, masks)
    adapters = [m for m in model.modules() if isinstance(m, APTLinear)]
    assert len(adapters) == 10 and all(a.lora_A.requires_grad and a.lora_B.requires_grad for a in adapters)
    assert all(not a.weight.requires_grad for a in adapters)
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(**batch)), masked, atol=1e-5, rtol=0)
    shape = aptune.StructureShape.of(aptune.describe(model))
    assert list(shape.heads) == [int(m.sum()) for m in masks.heads]
    assert shape.hidden == int(masks.hidden.sum())

    # merge after compaction: a plain, smaller model with the same outputs
    assert merge_adapters(model) == 10
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(**batch)), masked, atol=1e-5, rtol=0)


def test_hooks_follow_wrap_and_merge():
    """Mask hooks installed before wrapping or merging still act on the whole layer."""
    model = tiny_model("BertForSequenceClassification")
    batch = tiny_batch()
    masks = _binary_masks(model)
    aptune.apply_masks(model, masks)
    ad = wrap_linear(model.bert.pooler, "dense", rank=3)  # a hidden producer: its output is masked
    out_ad = wrap_linear(model.bert.encoder.layer[1].attention.output, "dense", rank=3)  # head-masked input
    with torch.no_grad():
        ad.lora_B.normal_()
        out_ad.lora_B.normal_()
        masked = first_output(model(**batch))
    merge_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(**batch)), masked, atol=1e-5, rtol=0)
    aptune.compact(model)
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(**batch)), masked, atol=1e-5, rtol=0)


# -- dtype: fp32 adapter factors on a low-precision base, as in PEFT -----------------------------------------


def factor_dtypes(ad: APTLinear) -> set[torch.dtype]:
    tensors = [ad.lora_A, ad.lora_B] + [t for t in (ad.teacher_A, ad.teacher_B) if t is not None]
    return {t.dtype for t in tensors}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factors_stay_fp32_on_a_low_precision_base(dtype):
    ad = make_adapter(in_f=16, out_f=12, rank=4, dtype=dtype)
    assert ad.weight.dtype == dtype and factor_dtypes(ad) == {torch.float32}
    ad.snapshot_teacher()
    assert factor_dtypes(ad) == {torch.float32} and ad.teacher_A.dtype == torch.float32
    ad.grow(8, generator=torch.Generator().manual_seed(0))
    assert factor_dtypes(ad) == {torch.float32}
    ad.aptune_slice(torch.tensor([0, 2, 5, 11]), torch.tensor([1, 3, 4, 8, 15]))
    assert factor_dtypes(ad) == {torch.float32}
    assert ad.weight.dtype == dtype and ad.lora_A.shape == (8, 5) and ad.teacher_B.shape == (4, 4)
    x = torch.randn(3, 5, dtype=dtype)
    for teacher in (False, True):
        ad.use_teacher = teacher
        assert ad(x).dtype == dtype
    # the distillation transform: an identity in the model's dtype, fp32 factors
    tr = identity_transform(16, 8, dtype=dtype)
    assert tr.weight.dtype == dtype and factor_dtypes(tr) == {torch.float32}
    h = torch.randn(2, 3, 16, dtype=dtype)
    assert tr(h).dtype == dtype and torch.equal(tr(h), h)


def test_wrapping_a_bf16_model_gives_fp32_factors():
    model = tiny_model("BertForSequenceClassification").to(torch.bfloat16)
    adapters = aptune.adapter.add_adapters(model, ["q", "v", "up"], rank=4)
    assert len(adapters) == 9 and all(factor_dtypes(a) == {torch.float32} for a in adapters)
    batch = tiny_batch()
    out = first_output(model(**batch))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_small_updates_are_not_lost_on_a_bf16_base():
    """An AdamW step of ~1e-4 on an entry of 0.05 moves an fp32 factor; in bf16 it would round back to 0.05."""
    ad = make_adapter(in_f=8, out_f=6, rank=2, dtype=torch.bfloat16)
    with torch.no_grad():
        ad.lora_B.fill_(0.05)
    before = ad.lora_B.detach().clone()
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    out = ad(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    assert ad.lora_B.grad.dtype == torch.float32 and bool((ad.lora_B.grad != 0).all())
    lr = 1e-4  # AdamW's first step moves every entry by about lr (the update is lr * g / |g|)
    torch.optim.AdamW([ad.lora_A, ad.lora_B], lr=lr, weight_decay=0.0).step()
    change = (ad.lora_B.detach() - before).abs()
    torch.testing.assert_close(change, torch.full_like(change, lr), atol=1e-6, rtol=0)
    # the same step on a bf16 master weight is lost: 0.05 +- 1e-4 rounds back to 0.05 (bf16 spacing ~2.4e-4)
    bf16 = nn.Parameter(torch.full((6, 2), 0.05, dtype=torch.bfloat16))
    bf16.grad = ad.lora_B.grad.to(torch.bfloat16)
    torch.optim.AdamW([bf16], lr=lr, weight_decay=0.0).step()
    assert torch.equal(bf16.detach(), torch.full((6, 2), 0.05, dtype=torch.bfloat16))


def test_bf16_forward_merge_and_autocast():
    ad = make_adapter(in_f=16, out_f=12, rank=4, dtype=torch.bfloat16)
    with torch.no_grad():
        ad.lora_B.mul_(0.1)
    W0, b = ad.weight.float(), ad.bias.float()
    delta = 2.0 * ad.lora_B.detach() @ ad.lora_A.detach()  # fp32
    merged = ad.merged_weight()
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged, (W0 + delta).to(torch.bfloat16), atol=0, rtol=0)
    torch.testing.assert_close(merged.float(), W0 + delta, atol=1e-2, rtol=1e-2)
    layer = ad.merge()
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16 and torch.equal(layer.weight, merged)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    expected = x.float() @ (W0 + delta).T + b
    y = ad(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=2e-2)
    # under autocast the layer runs in the autocast dtype and still trains its fp32 factors
    for base_dtype in (torch.bfloat16, torch.float32):
        ad = make_adapter(in_f=16, out_f=12, rank=4, dtype=base_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ad(torch.randn(5, 16))
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert ad.lora_B.grad.dtype == torch.float32 and bool(ad.lora_B.grad.abs().sum() > 0)
