"""Fused Triton kernels for PNTrack's DCA prompt sampling (training only).

PNTrack's DCA step picks the prompt tokens handed to the next tracking step:
in the last ViT block every search token is scored by how much attention the
template rows pay it (mean over heads and template rows), times the
classification map, and the top-K search tokens become the (detached) prompts
-- "attention map x classification map, then top-K".

Eager PyTorch builds the whole (B, H, N, N) attention map for this, about 1 GB
in bf16 at pntrack-384 (B=40, H=12, N=1016), to read n_z x Nx of it. The two
kernels below compute the same result from q and k directly:

  1. attn_score   flash-style softmax of the template rows; keeps only the
                  column sums over search keys, never the map.
  2. topk_gather  per-row top-K of the scores plus the gather of the chosen
                  token rows, in one launch.

Each kernel sits next to its plain PyTorch reference; `backend="auto"` uses
Triton for CUDA tensors and the reference otherwise.

Run `python kernels.py`: checks the kernels against the references (under
TRITON_INTERPRET=1 when there is no GPU) and, on a CUDA GPU, benchmarks eager
vs reference vs Triton for the tiny / pntrack-256 / pntrack-384 shapes.
"""
# Annotations stay unevaluated strings, so `tl.constexpr` below needs no triton
# at import time; triton.jit still recognises them as "constexpr".
from __future__ import annotations

import math
import os

import torch

# TRITON_INTERPRET is read when @triton.jit runs, so it must be set before the
# kernels below are defined. Only a script run on a CPU machine sets it;
# importing this module as a library never does.
if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; without it only the references run
    triton = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


def _use_triton(backend, x):
    """auto: Triton for CUDA tensors when triton is installed; torch / triton force a path."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and triton is None:
        raise RuntimeError("backend='triton' needs the triton package (Linux only); use 'auto' or 'torch'")
    return backend == "triton" or (backend == "auto" and triton is not None and x.is_cuda)


# %%
# Attention score of each search token
# ------------------------------------
# For batch b and search token j (key column c = n_ctx + n_z + j):
#
#     score[b, j] = cls[b, j] * mean_{h, i in template} softmax_i(q_i . K^T / sqrt(Dh))[c]
#
# The softmax of each template row i runs over all N keys (context, template,
# search), so it needs the row's max and sum over N before any column can be
# normalised. The kernel makes two passes over the keys for a block of
# template rows, as in flash attention's backward:
#   pass 1: online max m_i and sum l_i over all N keys (the log-sum-exp);
#   pass 2: recompute the logits of the search keys only, normalise with
#           (m_i, l_i) and sum over the block's rows -> one (Nx,) partial sum.
# Each program writes one (Nx,) fp32 partial sum per (b, h, row block); a
# deterministic torch sum over heads and row blocks finishes the mean (no
# atomics). Bytes at pntrack-384 (B=40, H=12, n_z=432, N=1016, bf16): eager
# writes and rereads a 0.99 GB map (plus a 1.98 GB fp32 softmax under
# autocast); the kernel reads q's template rows and k, 89 MB, and writes 7.7 MB
# of partial sums.


def attn_score_ref(q, k, cls_map, n_ctx, n_z):
    """Reference: materialise the template rows of the attention map (fp32)."""
    q_z = q[:, :, n_ctx:n_ctx + n_z].float()  # (B, H, n_z, Dh)
    attn = ((q_z @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, n_z, N)
    return attn[..., n_ctx + n_z:].mean((1, 2)) * cls_map.float()  # (B, Nx)


@_jit
def _attn_score_kernel(
    q_ptr, k_ptr, out_ptr,
    sq_b, sq_h, sq_n, sq_d,  # q strides: q is a strided view of the fused qkv
    sk_b, sk_h, sk_n, sk_d,
    so_b, so_h, so_m,  # out: (B, H, row blocks, Nx), last dim contiguous
    N, n_ctx, n_z, Nx, Dh,
    qk_scale,  # log2(e) / sqrt(Dh): the logits come out in base 2, for exp2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64: b * stride can pass 2**31 elements
    rows = n_ctx + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # this block's template rows
    row_ok = rows < n_ctx + n_z
    d = tl.arange(0, BLOCK_D)
    d_ok = d < Dh
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h

    # Padded rows and head dims load as 0, so they add nothing to the dot products.
    q = tl.load(q_base + rows[:, None] * sq_n + d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    # Pass 1: running max and running sum of exp over all N keys.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + cols[None, :] * sk_n + d[:, None] * sk_d,
                     mask=(cols[None, :] < N) & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        # "ieee" keeps fp32 inputs exact on GPUs (the default would be tf32);
        # bf16 inputs ignore it and accumulate in fp32 on the tensor cores.
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new

    # Pass 2: softmax probabilities of the search keys, summed over the rows.
    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)  # padded rows contribute nothing
    x0 = n_ctx + n_z  # first search key
    out_base = out_ptr + b * so_b + h * so_h + pid_m * so_m
    for start in range(0, Nx, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # search token index
        kt = tl.load(k_base + (x0 + j)[None, :] * sk_n + d[:, None] * sk_d,
                     mask=(j[None, :] < Nx) & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - m_i[:, None]) * inv_l[:, None]
        tl.store(out_base + j, tl.sum(p, 0), mask=j < Nx)  # (BLOCK_N,)


def _attn_score_triton(q, k, cls_map, n_ctx, n_z):
    B, H, N, Dh = q.shape
    Nx = N - n_ctx - n_z
    if not q.is_cuda:  # CPU means the interpreter, whose numpy tl.dot has no bf16
        q, k = q.float(), k.float()
    # tl.dot wants every block dim >= 16; tl.arange wants powers of two.
    BLOCK_M = min(64, max(16, triton.next_power_of_2(n_z)))
    BLOCK_N = 64
    BLOCK_D = max(16, triton.next_power_of_2(Dh))
    grid = (triton.cdiv(n_z, BLOCK_M), H, B)
    partial = torch.empty(B, H, grid[0], Nx, device=q.device, dtype=torch.float32)  # (B, H, row blocks, Nx)
    _attn_score_kernel[grid](
        q, k, partial, *q.stride(), *k.stride(), *partial.stride()[:3],
        N, n_ctx, n_z, Nx, Dh, math.log2(math.e) / math.sqrt(Dh),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return partial.sum((1, 2)) * (cls_map.float() / (H * n_z))  # (B, Nx)


def attn_score(q, k, cls_map, n_ctx, n_z, backend="auto"):
    """DCA score of each search token, (B, Nx) float32.

    q, k: (B, H, N, Dh) last-block queries / keys (fp32 or bf16, any strides),
    tokens ordered [context (n_ctx); template (n_z); search (Nx)].
    cls_map: (B, Nx) sigmoid class map, flattened in search-token order.
    """
    if cls_map.shape[-1] != q.shape[2] - n_ctx - n_z:
        raise ValueError(f"cls_map has {cls_map.shape[-1]} tokens, q has {q.shape[2] - n_ctx - n_z} search tokens")
    impl = _attn_score_triton if _use_triton(backend, q) else attn_score_ref
    return impl(q, k, cls_map, n_ctx, n_z)


# %%
# Top-K selection and gather
# --------------------------
# Each row of scores has Nx <= 576 entries and we want K <= 32 of them, so one
# program per batch row holds the whole row in registers and runs K rounds of
# "take the max, lowest index among equals, then drop it" -- the tie rule of
# a stable descending sort. Right after picking an index it copies that token
# row of feats to the output. The bytes are small (92 KB of scores and 0.5 MB
# of gathered bf16 rows at pntrack-384), so the win is launches: eager runs
# topk, an index expand and a gather as separate kernels; this is one.
#
# No backward: DCA prompts are detached by design (they carry no gradient into
# the step that produced them), so the tokens are returned detached.


def topk_gather_ref(score, feats, k):
    """Reference: stable descending sort (lowest index wins ties), then gather."""
    idx = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    tokens = feats.detach().gather(1, idx[:, :, None].expand(-1, -1, feats.shape[2]))  # (B, k, D)
    return idx, tokens


@_jit
def _topk_gather_kernel(
    score_ptr, feat_ptr, idx_ptr, out_ptr,
    ss_b, ss_n, sf_b, sf_n, sf_d, si_b, so_b, so_k,
    Nx, D, K,
    BLOCK_X: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_X)
    d = tl.arange(0, BLOCK_D)
    s = tl.load(score_ptr + b * ss_b + offs * ss_n, mask=offs < Nx, other=float("-inf"))  # (BLOCK_X,)
    # Candidates not yet taken; a mask rather than overwriting s with -inf, so
    # rows whose own scores are -inf still follow the stable-sort order.
    free = offs < Nx
    for t in range(K):
        best = tl.max(tl.where(free, s, float("-inf")), 0)
        i = tl.min(tl.where(free & (s == best), offs, BLOCK_X), 0)  # lowest index among the maxima
        free = free & (offs != i)
        tl.store(idx_ptr + b * si_b + t, i.to(tl.int64))
        row = tl.load(feat_ptr + b * sf_b + i * sf_n + d * sf_d, mask=d < D)  # (BLOCK_D,), feats' dtype
        tl.store(out_ptr + b * so_b + t * so_k + d, row, mask=d < D)


def _topk_gather_triton(score, feats, k):
    B, Nx = score.shape
    D = feats.shape[2]
    idx = torch.empty(B, k, device=score.device, dtype=torch.int64)
    tokens = torch.empty(B, k, D, device=feats.device, dtype=feats.dtype)
    _topk_gather_kernel[(B,)](
        score, feats, idx, tokens, *score.stride(), *feats.stride(), idx.stride(0), *tokens.stride()[:2],
        Nx, D, k,
        BLOCK_X=triton.next_power_of_2(Nx), BLOCK_D=triton.next_power_of_2(D), num_warps=4,
    )
    return idx, tokens


def topk_gather(score, feats, k, backend="auto"):
    """Top-k search tokens per row: (idx (B, k) int64, tokens (B, k, D) detached).

    score: (B, Nx) finite scores; feats: (B, Nx, D) search tokens (output keeps
    their dtype). Descending order, ties go to the lowest index.
    """
    if not 1 <= k <= score.shape[1]:
        raise ValueError(f"k must be in [1, {score.shape[1]}], got {k}")
    impl = _topk_gather_triton if _use_triton(backend, score) else topk_gather_ref
    return impl(score, feats, k)


# %%
# Check and benchmark
# -------------------
# The benchmark's eager baseline is the prompt step as a model would write it
# under bf16 autocast: full attention map, slice, mean, torch.topk, gather.


def _eager_prompt_step(q, k, cls_map, feats, n_ctx, n_z, top_k):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, N, N)
        score = attn[:, :, n_ctx:n_ctx + n_z, n_ctx + n_z:].mean((1, 2)) * cls_map  # (B, Nx)
    idx = score.topk(top_k, dim=1).indices  # (B, k)
    return idx, feats.gather(1, idx[:, :, None].expand(-1, -1, feats.shape[2]))  # (B, k, D)


def _inputs(B, H, Dh, n_ctx, n_z, Nx, D, device, dtype):
    """q and k as the strided views a fused qkv projection produces."""
    N = n_ctx + n_z + Nx
    qkv = torch.randn(B, N, 3, H, Dh, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
    cls_map = torch.rand(B, Nx, device=device)
    feats = torch.randn(B, Nx, D, device=device, dtype=dtype)
    return qkv[0], qkv[1], cls_map, feats


def _check(q, k, cls_map, feats, n_ctx, n_z, rtol, atol, top_k=8):
    """Triton vs reference on one input; returns the largest score error."""
    ref = attn_score_ref(q, k, cls_map, n_ctx, n_z)
    out = attn_score(q, k, cls_map, n_ctx, n_z, backend="triton")
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    # Same scores in, so the same tie rule must give the same indices and rows.
    idx_ref, tok_ref = topk_gather_ref(ref, feats, top_k)
    idx, tok = topk_gather(ref, feats, top_k, backend="triton")
    assert torch.equal(idx, idx_ref) and torch.equal(tok, tok_ref)
    return (out - ref).abs().max().item()


def _benchmark(B=40, top_k=8):
    shapes = {
        "tiny": dict(H=3, Dh=64, n_ctx=8, n_z=48, Nx=64, D=192),
        "pntrack-256": dict(H=12, Dh=64, n_ctx=8, n_z=192, Nx=256, D=768),
        "pntrack-384": dict(H=12, Dh=64, n_ctx=8, n_z=432, Nx=576, D=768),
    }
    print(f"B={B}, k={top_k}, bf16 q/k; median of triton.testing.do_bench")
    print(f"{'shape':<12} {'path':<10} {'ms':>8} {'speed-up':>9} {'GB/s':>8} {'extra MiB':>10} {'floor MiB':>10}")
    for name, shape in shapes.items():
        q, k, cls_map, feats = _inputs(B, **shape, device="cuda", dtype=torch.bfloat16)
        n_ctx, n_z = shape["n_ctx"], shape["n_z"]
        # bf16 inputs, but both sides compute in fp32: only summation order differs.
        err = _check(q, k, cls_map, feats, n_ctx, n_z, rtol=1e-3, atol=1e-6, top_k=top_k)
        paths = {
            "eager": lambda: _eager_prompt_step(q, k, cls_map, feats, n_ctx, n_z, top_k),
            "reference": lambda: topk_gather(attn_score(q, k, cls_map, n_ctx, n_z, "torch"), feats, top_k, "torch"),
            "triton": lambda: topk_gather(attn_score(q, k, cls_map, n_ctx, n_z, "triton"), feats, top_k, "triton"),
        }
        # Memory floor: q and k read once. Bandwidth also counts cls in and the gathered rows out.
        floor = (q.numel() + k.numel()) * q.element_size()
        moved = floor + cls_map.numel() * cls_map.element_size() + B * top_k * shape["D"] * feats.element_size()
        times = {}
        for path, fn in paths.items():
            times[path] = ms = triton.testing.do_bench(fn, return_mode="median")
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
            print(f"{name:<12} {path:<10} {ms:8.3f} {times['eager'] / ms:8.1f}x {moved / ms / 1e6:8.0f} "
                  f"{extra / 2**20:10.1f} {floor / 2**20:10.1f}")
        print(f"{name:<12} triton vs reference: max |score error| {err:.2e}, top-k indices equal")


if __name__ == "__main__":
    if triton is None:
        raise SystemExit("triton is not installed (Linux only): only the PyTorch references are available")
    torch.manual_seed(0)
    # Non-power-of-two sizes exercise the masks; the second shape has n_ctx=0.
    cpu_shapes = [dict(B=2, H=3, Dh=24, n_ctx=8, n_z=49, Nx=196, D=72),
                  dict(B=1, H=2, Dh=64, n_ctx=0, n_z=16, Nx=64, D=192)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in cpu_shapes:
        q, k, cls_map, feats = _inputs(**shape, device=device, dtype=torch.float32)
        err = _check(q, k, cls_map, feats, shape["n_ctx"], shape["n_z"], rtol=1e-5, atol=1e-5)
        print(f"ok  {shape}: triton vs reference max |score error| {err:.2e}, top-k indices equal")
    if torch.cuda.is_available():
        _benchmark()
    else:
        print("no CUDA GPU: ran the kernels under TRITON_INTERPRET=1; the benchmark needs a GPU")
