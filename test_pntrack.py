"""Tests for pntrack: run `pytest -q`. Small synthetic inputs, values checked against hand-computed results.

Tests that use the real sequences in ../shared/data/sequences skip when that folder is absent.
"""
import os

# Triton reads TRITON_INTERPRET when kernels are decorated, i.e. at import: set it before importing
# pntrack/kernels so the kernels run on CPU tensors in the interpreter (no GPU here).
os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import kernels
import pntrack
from pntrack import box_from_crop, box_iou, box_to_crop, crop_image, crop_tensor, make_config

torch.set_num_threads(min(2, os.cpu_count() or 1))


def textured_image(h, w, seed=0):
    """Smooth random colour texture, uint8 (h, w, 3)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, h // 8 + 1, w // 8 + 1, generator=g)
    big = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (big.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# --- boxes ------------------------------------------------------------------------------------------------

def xyxy(x1, y1, x2, y2):
    return torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=torch.float64)


def test_iou_and_giou_match_hand_computed_values():
    a = xyxy(0, 0, 2, 2)
    cases = [
        (a, 1.0, 1.0),                                    # identical
        (xyxy(3, 0, 5, 2), 0.0, -2 / 10),                 # disjoint: enclosure 10, union 8
        (xyxy(1, 1, 3, 3), 1 / 7, 1 / 7 - 2 / 9),         # overlap 1, union 7, enclosure 9
        (xyxy(0, 0, 1, 2), 0.5, 0.5),                     # contained half: enclosure = union
    ]
    for b, iou, giou in cases:
        got_iou, got_giou = box_iou(a, b)
        assert got_iou.item() == pytest.approx(iou, abs=1e-9)
        assert got_giou.item() == pytest.approx(giou, abs=1e-9)


def test_xywh_conversions_round_trip():
    b = np.array([[10.0, 20.0, 30.0, 40.0]])
    assert np.allclose(pntrack.xywh_to_cxcywh(b), [[25, 40, 30, 40]])
    assert np.allclose(pntrack.cxcywh_to_xywh(pntrack.xywh_to_cxcywh(b)), b)


# --- crops ------------------------------------------------------------------------------------------------

EDGE_BOXES = [  # (cx, cy, w, h) on a 120 x 80 image: inside, touching each edge, corner, larger than image
    (60.0, 40.0, 20.0, 12.0), (5.0, 40.0, 10.0, 10.0), (115.0, 40.0, 10.0, 16.0),
    (60.0, 3.0, 30.0, 6.0), (110.0, 75.0, 20.0, 10.0), (60.0, 40.0, 200.0, 150.0),
]


@pytest.mark.parametrize("box", EDGE_BOXES)
def test_image_crop_maps_boxes_both_ways_and_shows_the_object_there(box):
    box = np.array(box)
    img = np.zeros((80, 120, 3), np.uint8)
    x1, y1 = int(round(box[0] - box[2] / 2)), int(round(box[1] - box[3] / 2))
    x2, y2 = int(round(box[0] + box[2] / 2)), int(round(box[1] + box[3] / 2))
    img[max(y1, 0):y2, max(x1, 0):x2] = 255
    crop, tf = crop_image(Image.fromarray(img), box, 2.0, 64)
    in_crop = box_to_crop(box, tf)
    assert np.allclose(box_from_crop(in_crop, tf), box)
    # the crop is square and centred: the box centre maps to the crop centre, its size scales by 64 / side
    assert np.allclose(in_crop[:2], 32.0)
    assert np.allclose(in_crop[2:], box[2:] * 64 / (math.sqrt(box[2] * box[3]) * 2))
    # the white object's visible part lies where the mapping says (within a pixel of resampling blur)
    vis = np.array([max(x1, 0), max(y1, 0), min(x2, 120), min(y2, 80)], float)
    vis_crop = np.clip((vis - tf[[0, 1, 0, 1]]) / tf[2], 0, 64)    # the object may overhang the crop
    ys, xs = np.nonzero(crop[..., 0] > 127)
    assert abs(xs.min() - vis_crop[0]) <= 1.5 and abs(xs.max() + 1 - vis_crop[2]) <= 1.5
    assert abs(ys.min() - vis_crop[1]) <= 1.5 and abs(ys.max() + 1 - vis_crop[3]) <= 1.5


def test_tensor_crop_matches_image_crop_and_round_trips():
    img = textured_image(80, 120)
    boxes = torch.tensor(EDGE_BOXES[:5], dtype=torch.float64)
    images = torch.from_numpy(img).permute(2, 0, 1)[None].double().expand(len(boxes), -1, -1, -1)
    crops, tf = crop_tensor(images, boxes, 2.0, 48)
    assert torch.allclose(box_from_crop(box_to_crop(boxes, tf), tf), boxes)
    for i, box in enumerate(boxes.numpy()):
        ref, ref_tf = crop_image(Image.fromarray(img), box, 2.0, 48)
        assert np.allclose(tf[i].numpy(), ref_tf)
        diff = np.abs(crops[i].permute(1, 2, 0).numpy() - ref.astype(float))
        # identical sampling inside the image; only the half-pixel border rim may differ (PIL clamps there)
        assert np.median(diff) < 1.0 and np.mean(diff) < 3.0


def test_tensor_crop_passes_gradients_to_the_box():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    blob = torch.exp(-((xx - 30) ** 2 + (yy - 34) ** 2) / 200.0).expand(1, 3, 64, 64).double()
    box = torch.tensor([[28.0, 30.0, 16.0, 12.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def f(b):
        return (crop_tensor(blob, b, 2.0, 24)[0] * weight).sum()
    f(box).backward()
    assert box.grad.abs().sum() > 0
    # directional derivative equals the finite difference (the image is smooth)
    d, eps = torch.tensor([[0.3, -0.5, 0.2, 0.4]], dtype=torch.float64), 1e-4
    fd = (f(box.detach() + eps * d) - f(box.detach() - eps * d)) / (2 * eps)
    assert (box.grad * d).sum().item() == pytest.approx(fd.item(), rel=1e-3)


# --- head and losses --------------------------------------------------------------------------------------

def test_decode_box_reads_peak_cell_offset_and_size():
    G = 8
    score = torch.zeros(1, 1, G, G)
    score[0, 0, 5, 2] = 0.9                            # row 5, column 2
    size = torch.full((1, 2, G, G), 0.1)
    size[0, :, 5, 2] = torch.tensor([0.25, 0.5])
    offset = torch.full((1, 2, G, G), 0.5)
    offset[0, :, 5, 2] = torch.tensor([0.2, 0.6])
    box = pntrack.decode_box(score, size, offset)[0]
    assert torch.allclose(box, torch.tensor([(2 + 0.2) / G, (5 + 0.6) / G, 0.25, 0.5]))


def test_gaussian_target_peaks_at_the_centre_cell():
    heat = pntrack.gaussian_heatmap(torch.tensor([[0.40, 0.70, 0.3, 0.2]]), 16)[0, 0]
    assert heat[11, 6] == 1.0 and (heat == 1).sum() == 1     # cell (row floor(.7*16), col floor(.4*16))
    assert heat[11, 7] < 1 and heat[11, 9] < heat[11, 7]


def test_focal_loss_is_lower_for_a_heatmap_matching_the_label():
    target = pntrack.gaussian_heatmap(torch.tensor([[0.5, 0.5, 0.3, 0.3]]), 16)
    matching = target.clamp(1e-4, 1 - 1e-4)
    shifted = torch.roll(matching, shifts=(4, 3), dims=(2, 3))
    assert pntrack.focal_loss(matching, target) < 0.5 * pntrack.focal_loss(shifted, target)


def test_track_loss_is_zero_box_loss_for_a_perfect_prediction():
    target = torch.tensor([[0.53, 0.47, 0.3, 0.2]])
    G = 8
    score = torch.full((1, 1, G, G), 1e-4)
    score[0, 0, 3, 4] = 1 - 1e-4                        # the target's cell: (floor(.47*8), floor(.53*8))
    size = torch.zeros(1, 2, G, G)
    size[0, :, 3, 4] = torch.tensor([0.3, 0.2])
    offset = torch.zeros(1, 2, G, G)
    offset[0, :, 3, 4] = torch.tensor([0.53 * 8 - 4, 0.47 * 8 - 3])
    total, focal, giou, l1 = pntrack.track_loss(score, size, offset, target)
    assert giou.item() == pytest.approx(0, abs=1e-6) and l1.item() == pytest.approx(0, abs=1e-6)


# --- the network ------------------------------------------------------------------------------------------

def test_pntrack256_has_about_92M_parameters():
    net = pntrack.PNTrack(make_config("pntrack-256"))
    n = sum(p.numel() for p in net.parameters())
    print(f"pntrack-256 inference parameters: {n / 1e6:.1f}M (SSTrack table: 92M)")
    assert 91e6 < n < 93.5e6


def test_make_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown config"):
        make_config("vit-huge")
    with pytest.raises(ValueError, match="embed_dimm"):
        make_config("tiny", embed_dimm=3)


def fake_mae_checkpoint(cfg, dropmae=False):
    """A state dict in MAE's format (timm names, cls slot, 14x14 pos_embed, decoder), random values."""
    g = torch.Generator().manual_seed(0)
    D = cfg.embed_dim

    def r(*shape):
        return torch.randn(*shape, generator=g)
    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + 14 * 14, D), "mask_token": r(1, 1, 16),
          "patch_embed.proj.weight": r(D, 3, 16, 16), "patch_embed.proj.bias": r(D),
          "norm.weight": r(D), "norm.bias": r(D),
          "decoder_embed.weight": r(16, D), "decoder_pos_embed": r(1, 197, 16), "decoder_pred.bias": r(768)}
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(D), p + "norm1.bias": r(D), p + "attn.qkv.weight": r(3 * D, D),
                   p + "attn.qkv.bias": r(3 * D), p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D),
                   p + "norm2.weight": r(D), p + "norm2.bias": r(D), p + "mlp.fc1.weight": r(4 * D, D),
                   p + "mlp.fc1.bias": r(4 * D), p + "mlp.fc2.weight": r(D, 4 * D), p + "mlp.fc2.bias": r(D)})
    if dropmae:
        sd["temporal_pos_embed_x"], sd["temporal_pos_embed_z"] = r(1, 1, D), r(1, 1, D)
    return sd


@pytest.mark.parametrize("dropmae", [False, True])
def test_load_pretrained_loads_every_backbone_tensor(tmp_path, dropmae):
    cfg = make_config("tiny")
    sd = fake_mae_checkpoint(cfg, dropmae)
    ckpt = {"model": sd}
    if dropmae:      # DropMAE pickles its argparse namespace next to the weights
        ckpt["args"] = argparse.Namespace(lr=1e-4)
    path = tmp_path / "mae.pth"
    torch.save(ckpt, path)
    net = pntrack.PNTrack(cfg)
    missing, unexpected = pntrack.load_pretrained(net, str(path))
    own = net.state_dict()
    for key, value in sd.items():
        if key.startswith(("patch_embed.", "blocks.", "norm.")):
            assert torch.equal(own[key], value), key
    grid = sd["pos_embed"][:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    for name, g in (("pos_z", 4), ("pos_x", 8)):
        ref = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
        assert torch.allclose(own[name], ref.permute(0, 2, 3, 1).reshape(1, g * g, -1), atol=1e-6)
    assert all(k.startswith("head.") for k in missing) and missing
    expected = {"cls_token", "mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_pred.bias"}
    if dropmae:
        expected |= {"temporal_pos_embed_x", "temporal_pos_embed_z"}
    assert set(unexpected) == expected


def test_load_pretrained_names_the_file_when_it_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        pntrack.load_pretrained(pntrack.PNTrack(make_config("tiny")), str(path))
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(5, 3, 16, 16)}}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        pntrack.load_pretrained(pntrack.PNTrack(make_config("tiny")), str(tmp_path / "wrong.pth"))


def test_checkpoint_round_trip_restores_config_and_weights(tmp_path):
    net = pntrack.PNTrack(make_config("tiny", n_templates=2))
    pntrack.save_checkpoint(str(tmp_path / "m.pt"), net)
    back = pntrack.load_checkpoint(str(tmp_path / "m.pt"))
    assert back.cfg == net.cfg
    for (k, a), b in zip(net.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(f.startswith(".tmp-") for f in os.listdir(tmp_path))


# --- the tracker ------------------------------------------------------------------------------------------

def moving_square_clip(n=8, h=90, w=160, size=20, step=(6, 3)):
    """Frames with a textured square moving over a textured background, and its (x, y, w, h) boxes."""
    bg = textured_image(h, w, seed=1) // 2
    obj = textured_image(size, size, seed=2) // 2 + 128
    frames, boxes = [], []
    for t in range(n):
        x, y = 10 + step[0] * t, 20 + step[1] * t
        f = bg.copy()
        f[y:y + size, x:x + size] = obj
        frames.append(f)
        boxes.append((x, y, size, size))
    return frames, boxes


def test_tracker_returns_one_box_per_frame_inside_the_image():
    frames, boxes = moving_square_clip()
    tracker = pntrack.Tracker(pntrack.PNTrack(make_config("tiny")), device="cpu")
    tracker.init(frames[0], boxes[0])
    out = [tracker.update(f) for f in frames[1:]]
    assert len(out) == len(frames) - 1
    for x, y, w, h in out:
        assert 0 <= x and 0 <= y and x + w <= 160 + 1e-6 and y + h <= 90 + 1e-6 and w >= 10 and h >= 10


def test_tracker_converts_grey_and_rgba_images():
    frames, boxes = moving_square_clip(n=2)
    tracker = pntrack.Tracker(pntrack.PNTrack(make_config("tiny")), device="cpu")
    tracker.init(frames[0][..., 0], boxes[0])                                  # (H, W) grey
    rgba = np.concatenate([frames[1], np.full((90, 160, 1), 255, np.uint8)], 2)
    assert len(tracker.update(rgba)) == 4
    assert len(tracker.update(Image.fromarray(frames[1]).convert("L"))) == 4


@pytest.mark.parametrize("box", [(10, 10, 0, 5), (10, 10, 5, -1), (500, 10, 5, 5), (-20, -20, 10, 10)])
def test_tracker_init_rejects_bad_boxes_naming_box_and_image_size(box):
    tracker = pntrack.Tracker(pntrack.PNTrack(make_config("tiny")), device="cpu")
    with pytest.raises(ValueError, match=r"160x90"):
        tracker.init(np.zeros((90, 160, 3), np.uint8), box)


def test_template_memory_picks_first_plus_evenly_spaced_and_stays_bounded():
    tracker = pntrack.Tracker(pntrack.PNTrack(make_config("tiny", n_templates=3, memory_size=4)), device="cpu")
    tracker.first = torch.full((3, 64, 64), -1.0)
    tracker.memory = [torch.full((3, 64, 64), float(i)) for i in range(10)]
    z = tracker.templates()[0, :, 0, 0, 0]
    assert z.tolist() == [-1.0, 4.0, 9.0]         # history split in two segments: the end of each
    frames, boxes = moving_square_clip(n=12)
    tracker.init(frames[0], boxes[0])
    for f in frames[1:]:
        tracker.update(f)
        assert len(tracker.memory) < 8            # 2 * memory_size: thinned by half when reached


def test_clip_box_keeps_a_margin_inside_the_image():
    assert np.allclose(pntrack.clip_box(np.array([-50.0, 40.0, 20.0, 20.0]), 100, 80), [5, 40, 10, 20])
    assert np.allclose(pntrack.clip_box(np.array([50.0, 40.0, 300.0, 20.0]), 100, 80), [50, 40, 100, 20])

# --- kernels.py: Triton kernels against their PyTorch references (interpreter on CPU) -------------------
# Non-power-of-two sizes: 3 heads of Dh=24 (D=72), 7x7 template, 14x14 search.
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


# --- DCA and the training step ----------------------------------------------------------------------------

def tiny_batch(B=3, seed=0, cfg=None):
    """Random uint8 inputs of SelfSupervised.forward for the tiny config, targets inside the views."""
    cfg = cfg or make_config("tiny")
    g = torch.Generator().manual_seed(seed)
    L, Sz, Sx = cfg.frame_size, cfg.template_size, cfg.search_size

    def img(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    targets = torch.rand(B, cfg.n_bwd, 4, generator=g) * 0.2 + torch.tensor([0.4, 0.4, 0.15, 0.15])
    return img(B, 3, Sz, Sz), img(B, cfg.n_fwd, 3, L, L), img(B, cfg.n_bwd, 3, Sx, Sx), targets


def test_box_mask_marks_cells_whose_centre_is_inside_the_box():
    # 4x4 grid, cell centres at .125, .375, .625, .875; box x in [.25, .75], y in [0, .5]
    mask = pntrack.box_mask(torch.tensor([[0.5, 0.25, 0.5, 0.5]]), 4).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 1:3] = True
    assert torch.equal(mask, expected)


def test_instance_contrast_matches_nt_xent_by_hand_and_prefers_matching_views():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / 0.5
    by_hand = 0.0
    for i in range(6):
        pair = (i + 3) % 6
        others = [j for j in range(6) if j != i]
        by_hand += -(sim[i, pair] - torch.logsumexp(sim[i, others], 0)) / 6
    assert pntrack.instance_contrast(a, b, 0.5).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert pntrack.instance_contrast(a, a + 0.01, 0.5) < pntrack.instance_contrast(a, b, 0.5)
    assert pntrack.instance_contrast(a[:1], b[:1], 0.5).item() == 0.0          # no negatives: skipped


def test_dca_schedule_switches_from_prompts_to_noise_after_epoch_k():
    cfg = make_config("tiny", dca_epoch=4)
    assert [pntrack.dca_mode(cfg, e) for e in (1, 4, 5, 9)] == ["prompt", "prompt", "noise", "noise"]
    assert pntrack.dca_mode(replace_cfg(cfg, dca=False), 1) is None
    assert [pntrack.dca_mode(replace_cfg(cfg, prompt=False), e) for e in (1, 5)] == [None, "noise"]
    assert [pntrack.dca_mode(replace_cfg(cfg, noise=False), e) for e in (1, 5)] == ["prompt", None]
    soft = replace_cfg(cfg, dca_schedule="soft", dca_epoch=10, dca_ramp=4)   # ramp over epochs 6..14
    share = [np.mean([pntrack.dca_mode(soft, e, s) == "noise" for s in range(400)]) for e in (5, 10, 15)]
    assert share[0] == 0 and 0.35 < share[1] < 0.65 and share[2] == 1


def replace_cfg(cfg, **kw):
    from dataclasses import replace
    return replace(cfg, **kw)


def test_prompt_tokens_are_the_top_k_of_attention_times_class_map():
    torch.manual_seed(0)
    cfg = make_config("tiny", n_tokens=5)
    model = pntrack.SelfSupervised(cfg).eval()
    template, frames, views, _ = tiny_batch(B=2)
    z = pntrack.normalize(template)[:, None].repeat(1, 3, 1, 1, 1)                # (B, 3 templates, ...)
    x = pntrack.normalize(views[:, 0])
    ctx = torch.randn(2, 5, cfg.embed_dim)
    seen = {}
    last = model.net.blocks[-1]
    last.attn.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    score, size, offset, feats, box, tokens = model.step(z, x, ctx, "prompt")
    # by hand: the full attention map of the last block, rows of the templates, columns of the search
    B, N, D = seen["h"].shape
    q, k, _ = last.attn.qkv(seen["h"]).view(B, N, 3, cfg.n_heads, D // cfg.n_heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(D // cfg.n_heads)).softmax(-1)    # (B, H, N, N)
    n_z = 3 * 16
    a = attn[:, :, 5:5 + n_z, 5 + n_z:].mean((1, 2))                              # (B, Nx)
    s = a * score.flatten(1)
    for b in range(2):
        order = sorted(range(64), key=lambda j: -s[b, j].item())[:5]
        assert torch.allclose(tokens[b], feats[b, order], atol=1e-6)
    assert not tokens.requires_grad


def test_prompt_tokens_from_the_triton_kernels_equal_the_reference(monkeypatch):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    cfg = make_config("tiny")
    model = pntrack.SelfSupervised(cfg).eval()
    template, _, views, _ = tiny_batch(B=2)
    z, x = pntrack.normalize(template)[:, None], pntrack.normalize(views[:, 0])
    with torch.no_grad():
        reference = model.step(z, x, None, "prompt")[-1]
        attn_score, topk_gather = kernels.attn_score, kernels.topk_gather
        monkeypatch.setattr(kernels, "attn_score", lambda *a: attn_score(*a, backend="triton"))
        monkeypatch.setattr(kernels, "topk_gather", lambda *a: topk_gather(*a, backend="triton"))
        fused = model.step(z, x, None, "prompt")[-1]
    assert torch.allclose(fused, reference, atol=1e-6)


def test_noise_tokens_come_from_another_sample_and_outside_its_box():
    torch.manual_seed(0)
    cfg = make_config("tiny", n_tokens=8)
    B, Nx, D = 4, 64, 6
    # token j of sample b carries (b, j) so each drawn token tells where it came from
    feats = torch.zeros(B, Nx, D)
    feats[..., 0] = torch.arange(B).view(B, 1).float()
    feats[..., 1] = torch.arange(Nx).view(1, Nx).float()
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.4, 0.4], [0.7, 0.6, 0.3, 0.6], [0.4, 0.4, 0.7, 0.7]])
    inside = pntrack.box_mask(boxes, 8)
    for _ in range(5):
        tokens = pntrack.noise_tokens(cfg, feats, boxes)
        for b in range(B):
            src = tokens[b, :, 0].long()
            assert (src == (b - 1) % B).all()                           # rolled by one: another sequence
            idx = tokens[b, :, 1].long()
            assert not inside[(b - 1) % B, idx].any()                   # background of that sequence
            assert len(set(idx.tolist())) == 8                          # distinct tokens
    # a box over the whole grid leaves no background: still Kt distinct tokens, no crash
    full = pntrack.noise_tokens(cfg, feats, torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(B, 4))
    assert all(len(set(full[b, :, 1].tolist())) == 8 for b in range(B))


@pytest.mark.parametrize("mode", [None, "prompt", "noise"])
def test_training_step_gives_finite_losses_and_gradients_in_every_dca_mode(mode):
    torch.manual_seed(0)
    model = pntrack.SelfSupervised(make_config("tiny"))
    loss, terms = model(*tiny_batch(), mode=mode)
    loss.backward()
    assert torch.isfinite(terms).all() and len(terms) == len(pntrack.TERMS)
    assert model.net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert (terms[5] > 0) == (mode == "noise")                           # noise decoder loss only in noise mode
    noise_grad = model.dca.noise_decoder.q.weight.grad
    assert (noise_grad is not None) == (mode == "noise")
    if mode is not None:
        assert model.dca.ctx_type.grad.abs().sum() > 0                 # context tokens reached the network


def test_tracker_touches_no_dca_parameter_and_matches_a_model_built_without_dca():
    frames, boxes = moving_square_clip(n=5)
    outputs = []
    for dca in (True, False):
        torch.manual_seed(0)
        model = pntrack.SelfSupervised(make_config("tiny", dca=dca))
        if dca:
            for p in model.dca.parameters():
                p.data.fill_(float("nan"))     # any use of a DCA parameter at inference would show as NaN
        tracker = pntrack.Tracker(model.net, device="cpu")
        tracker.init(frames[0], boxes[0])
        outputs.append(np.array([tracker.update(f) for f in frames[1:]]))
    assert np.isfinite(outputs[0]).all()
    assert np.array_equal(outputs[0], outputs[1])
