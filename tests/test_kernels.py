"""kernels.py: the Triton kernels against their PyTorch references (the interpreter on CPU; conftest.py sets
TRITON_INTERPRET before kernels is imported), and the references against a materialised attention map.
"""
import pytest
import torch

import kernels

# non-power-of-two sizes, for the kernels' masks: 3 heads of Dh=24 (D=72), 7x7 template, 14x14 search
B, H, DH, NZ, NX, D = 2, 3, 24, 49, 196, 72


def _qk(n_ctx, n_z, dtype=torch.float32, seed=0):
    """q, k as the strided views a fused qkv projection produces, plus cls_map."""
    g = torch.Generator().manual_seed(seed)
    N = n_ctx + n_z + NX
    qkv = torch.randn(B, N, 3, H, DH, generator=g).to(dtype).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
    cls_map = torch.rand(B, NX, generator=g)
    return qkv[0], qkv[1], cls_map


def _tie_free_scores(seed=0):
    """(B, NX) scores with all values distinct, plus (B, NX, D) feats."""
    g = torch.Generator().manual_seed(seed)
    score = torch.stack([torch.randperm(NX, generator=g) for _ in range(B)]).float() / NX
    return score, torch.randn(B, NX, D, generator=g)


@pytest.mark.parametrize("n_ctx", [0, 8])
def test_attn_score_ref_equals_score_from_full_attention_map(n_ctx):
    q, k, cls_map = _qk(n_ctx, NZ)
    attn = (q @ k.transpose(-2, -1) / DH ** 0.5).softmax(-1)  # (B, H, N, N)
    expected = attn[:, :, n_ctx:n_ctx + NZ, n_ctx + NZ:].mean((1, 2)) * cls_map  # (B, Nx)
    torch.testing.assert_close(kernels.attn_score_ref(q, k, cls_map, n_ctx, NZ), expected)


@pytest.mark.parametrize("n_ctx", [0, 8])
def test_attn_score_triton_matches_reference(n_ctx):
    pytest.importorskip("triton")
    q, k, cls_map = _qk(n_ctx, NZ)
    out = kernels.attn_score(q, k, cls_map, n_ctx, NZ, backend="triton")
    assert out.shape == (B, NX) and out.dtype == torch.float32
    torch.testing.assert_close(out, kernels.attn_score_ref(q, k, cls_map, n_ctx, NZ), rtol=1e-5, atol=1e-5)


def test_attn_score_triton_matches_reference_with_two_template_groups():
    pytest.importorskip("triton")
    q, k, cls_map = _qk(8, 2 * NZ)  # n_z = 98 spans two row blocks of the kernel
    out = kernels.attn_score(q, k, cls_map, 8, 2 * NZ, backend="triton")
    torch.testing.assert_close(out, kernels.attn_score_ref(q, k, cls_map, 8, 2 * NZ), rtol=1e-5, atol=1e-5)


def test_attn_score_triton_accepts_bf16_and_returns_fp32():
    pytest.importorskip("triton")
    q, k, cls_map = _qk(8, NZ, dtype=torch.bfloat16)
    out = kernels.attn_score(q, k, cls_map, 8, NZ, backend="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, kernels.attn_score_ref(q, k, cls_map, 8, NZ), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_gather_triton_matches_reference_without_ties(dtype):
    pytest.importorskip("triton")
    score, feats = _tie_free_scores()
    feats = feats.to(dtype)
    idx, tokens = kernels.topk_gather(score, feats, 8, backend="triton")
    idx_ref, tokens_ref = kernels.topk_gather_ref(score, feats, 8)
    assert torch.equal(idx, idx_ref) and idx.dtype == torch.int64
    assert torch.equal(idx, score.topk(8, dim=1).indices)  # descending order
    assert tokens.dtype == dtype
    assert torch.equal(tokens, feats[torch.arange(B)[:, None], idx])  # (B, k, D) rows of feats
    assert torch.equal(tokens_ref, tokens)


def test_topk_gather_breaks_ties_by_lowest_index():
    pytest.importorskip("triton")
    score = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 2.0, 3.0, 0.0],
                          [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    feats = torch.arange(2 * 8 * 4, dtype=torch.float32).reshape(2, 8, 4)
    expected = torch.tensor([[1, 3, 4, 6, 2], [0, 1, 2, 3, 4]])
    for backend in ("torch", "triton"):
        idx, tokens = kernels.topk_gather(score, feats, 5, backend=backend)
        assert torch.equal(idx, expected), backend
        assert torch.equal(tokens, feats[torch.arange(2)[:, None], expected]), backend


def test_topk_gather_returns_detached_tokens():
    pytest.importorskip("triton")
    score, feats = _tie_free_scores()
    feats.requires_grad_(True)
    for backend in ("torch", "triton"):
        assert not kernels.topk_gather(score, feats, 4, backend=backend)[1].requires_grad, backend


def test_auto_backend_uses_reference_for_cpu_tensors(monkeypatch):
    def no_triton(*args):
        raise AssertionError("auto must not launch a Triton kernel for CPU tensors")

    monkeypatch.setattr(kernels, "_attn_score_triton", no_triton)
    monkeypatch.setattr(kernels, "_topk_gather_triton", no_triton)
    q, k, cls_map = _qk(8, NZ)
    score = kernels.attn_score(q, k, cls_map, 8, NZ)
    assert torch.equal(score, kernels.attn_score_ref(q, k, cls_map, 8, NZ))
    feats = torch.randn(B, NX, D)
    idx, _ = kernels.topk_gather(score, feats, 8)
    assert torch.equal(idx, kernels.topk_gather_ref(score, feats, 8)[0])


@pytest.mark.parametrize("k", [0, NX + 1])
def test_topk_gather_rejects_k_outside_1_to_nx(k):
    score, feats = _tie_free_scores()
    with pytest.raises(ValueError):
        kernels.topk_gather(score, feats, k)


def test_unknown_backend_raises_value_error():
    q, k, cls_map = _qk(0, NZ)
    score, feats = _tie_free_scores()
    with pytest.raises(ValueError):
        kernels.attn_score(q, k, cls_map, 0, NZ, backend="cuda")
    with pytest.raises(ValueError):
        kernels.topk_gather(score, feats, 8, backend="triton_fast")
