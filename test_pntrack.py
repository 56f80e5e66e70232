"""The method's tests, in the order of pntrack.py: 1 config, boxes, crops -> 2 the ViT and head (2b our pretrained
stem) -> 3 losses -> 4 DCA -> 5 the training step -> 6 the Tracker and checkpoints. Small synthetic inputs, values
checked against hand-computed results. The kernels' tests: tests/test_kernels.py; the scripts': tests/.
"""
import argparse
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import extras.media
import extras.synth
import kernels
import pntrack
import track
import train
from conftest import (BrightObjectNet, ConstantNet, fake_mae_checkpoint, make_clip, shared_data, stem_file, texture,
                      tiny)
from pntrack import box_from_crop, box_iou, box_to_crop, crop_image, crop_tensor, make_config


# --- 1. config, boxes and crops --------------------------------------------------------------------------------

def test_make_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown config"):
        make_config("vit-huge")
    with pytest.raises(ValueError, match="embed_dimm"):
        tiny(embed_dimm=3)


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
    img = texture(80, 120, seed=0)
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


# --- 2. the one-stream ViT and the center head -----------------------------------------------------------------

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


def test_pntrack256_has_about_92M_parameters():
    net = pntrack.PNTrack(make_config("pntrack-256"))
    n = sum(p.numel() for p in net.parameters())
    print(f"pntrack-256 inference parameters: {n / 1e6:.1f}M (SSTrack table: 92M)")
    assert 91e6 < n < 93.5e6


def test_the_token_sequence_is_context_then_templates_with_pos_z_then_search_with_pos_x():
    torch.manual_seed(0)
    net = pntrack.PNTrack(tiny(stem="patch16", depth=1))
    z, x, ctx = torch.randn(1, 2, 3, 64, 64), torch.randn(1, 3, 128, 128), torch.randn(1, 8, 192)
    seen = []
    net.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    net.encode(z, x, ctx)
    patches = net.patch_embed.proj
    z_tokens = patches(z[0]).flatten(2).transpose(1, 2) + net.pos_z                    # (2, 16, D)
    x_tokens = patches(x).flatten(2).transpose(1, 2) + net.pos_x                       # (1, 64, D)
    assert torch.allclose(seen[0], torch.cat([ctx, z_tokens.reshape(1, 32, -1), x_tokens], 1), atol=1e-6)


def test_drop_path_drops_whole_residual_branches_at_rates_linear_over_depth():
    # train.py --drop-path reaches the config; the rates rise linearly from 0 (first block) to it (last)
    cfg = train.config_from_args(train.parse_args(["--drop-path", "0.2"]))
    net = pntrack.PNTrack(replace(cfg, stem="patch16", depth=5))
    assert [b.drop_path for b in net.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    # in training a sample's branch is either gone (0) or scaled by 1 / (1 - p); in eval it passes unchanged
    torch.manual_seed(0)
    x = torch.randn(4000, 3, 2) + 3
    out = pntrack.drop_path(x, 0.25, training=True)
    kept = (out != 0).all(2).all(1)
    assert ((out == 0).all(2).all(1) | kept).all()
    assert torch.allclose(out[kept], x[kept] / 0.75) and abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(pntrack.drop_path(x, 0.25, training=False), x)
    with pytest.raises(ValueError, match="drop_path"):
        train.config_from_args(train.parse_args(["--drop-path", "1"]))


@pytest.mark.parametrize("dropmae", [False, True])
def test_load_pretrained_loads_every_backbone_tensor(tmp_path, dropmae):
    cfg = tiny(stem="patch16")                         # MAE / DropMAE weights are a ViT's: the patch16 stem
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
        pntrack.load_pretrained(pntrack.PNTrack(tiny()), str(path))
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(5, 3, 16, 16)}}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        pntrack.load_pretrained(pntrack.PNTrack(tiny()), str(tmp_path / "wrong.pth"))


def test_load_pretrained_accepts_a_pntrack_checkpoint_to_start_from(tmp_path):
    torch.manual_seed(0)
    source = pntrack.PNTrack(tiny())
    pntrack.save_checkpoint(str(tmp_path / "gen.pt"), source)
    torch.manual_seed(1)
    net = pntrack.PNTrack(tiny())
    missing, unexpected = pntrack.load_pretrained(net, str(tmp_path / "gen.pt"))
    assert missing == [] and unexpected == []
    for (k, a), b in zip(source.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k


# --- 2b. ours: the pretrained stem (issue 17), EfficientNet-Lite0 blocks 0-10 in place of the patch embedding --

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


# ImageNet classes of cars and vans: beach wagon, cab, convertible, jeep, limousine, minivan, Model T, pickup,
# police van, racer, sports car, moving van, grille
CAR_CLASSES = {436, 468, 511, 609, 627, 656, 661, 717, 734, 751, 817, 675, 581}


@pytest.mark.real_data
def test_the_stem_is_efficientnet_lite0_a_car_crop_lands_in_car_classes():
    folder = shared_data("pool2", "otb_Suv_first60")
    stem = pntrack.EffNetStem(192).eval()
    pntrack.load_stem_weights(stem, stem_file())
    classify = lite0_classifier(stem)
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
    net = pntrack.PNTrack(tiny())
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


@pytest.mark.slow
def test_stem_config_fields_change_what_training_does():
    torch.manual_seed(0)
    B = 2
    template = torch.randint(0, 255, (B, 3, 64, 64), dtype=torch.uint8)
    frames = torch.randint(0, 255, (B, 3, 3, 256, 256), dtype=torch.uint8)
    views = torch.randint(0, 255, (B, 2, 3, 128, 128), dtype=torch.uint8)
    targets = torch.tensor([[[0.5, 0.5, 0.3, 0.3]] * 2] * B)

    def one_step(**over):
        cfg = tiny(forward_search="global", **over)
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
        tiny(stem="resnet")


# --- 3. losses -------------------------------------------------------------------------------------------------

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


# --- 4. DCA: the schedule, prompt tokens, noise tokens (kernels.py's own tests: tests/test_kernels.py) ----------

def test_dca_schedule_switches_from_prompts_to_noise_after_epoch_k():
    cfg = tiny(dca_epoch=4)
    assert [pntrack.dca_mode(cfg, e) for e in (1, 4, 5, 9)] == ["prompt", "prompt", "noise", "noise"]
    assert pntrack.dca_mode(replace(cfg, dca=False), 1) is None
    assert [pntrack.dca_mode(replace(cfg, prompt=False), e) for e in (1, 5)] == [None, "noise"]
    assert [pntrack.dca_mode(replace(cfg, noise=False), e) for e in (1, 5)] == ["prompt", None]
    soft = replace(cfg, dca_schedule="soft", dca_epoch=10, dca_ramp=4)   # ramp over epochs 6..14
    share = [np.mean([pntrack.dca_mode(soft, e, s) == "noise" for s in range(400)]) for e in (5, 10, 15)]
    assert share[0] == 0 and 0.35 < share[1] < 0.65 and share[2] == 1


def tiny_batch(B=3, seed=0, cfg=None):
    """Random uint8 inputs of SelfSupervised.forward for the tiny config, targets inside the views."""
    cfg = cfg or tiny()
    g = torch.Generator().manual_seed(seed)
    L, Sz, Sx = cfg.frame_size, cfg.template_size, cfg.search_size

    def img(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    targets = torch.rand(B, cfg.n_bwd, 4, generator=g) * 0.2 + torch.tensor([0.4, 0.4, 0.15, 0.15])
    return img(B, 3, Sz, Sz), img(B, cfg.n_fwd, 3, L, L), img(B, cfg.n_bwd, 3, Sx, Sx), targets


def test_prompt_tokens_are_the_top_k_of_attention_times_class_map():
    torch.manual_seed(0)
    cfg = tiny(n_tokens=5)
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
    model = pntrack.SelfSupervised(tiny()).eval()
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
    cfg = tiny(n_tokens=8)
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


# --- 5. the self-supervised training step ---------------------------------------------------------------------

def originals_of(frames):
    """`originals` for SelfSupervised.forward from a tiny_batch's frames: those frames, the first box centred."""
    L = frames.shape[-1]
    return [{"box": np.array([L / 2, L / 2, L / 5, L / 6]), "frames": [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in fr]}
            for fr in frames]


def run_cycle(model, batch, mode):
    """One training step of `model` on a tiny_batch."""
    return model(*batch, mode=mode, originals=originals_of(batch[1]))


@pytest.mark.parametrize("mode", [None, "prompt", "noise"])
def test_training_step_gives_finite_losses_and_gradients_in_every_dca_mode(mode):
    torch.manual_seed(0)
    model = pntrack.SelfSupervised(tiny())
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
    model = pntrack.SelfSupervised(tiny())
    calls = record_encode_calls(model, monkeypatch)
    run_cycle(model, tiny_batch(), mode)
    # forward: 3 steps without gradient (step 1 without context); backward: view 1 none, view 2 carries
    assert [(g, c) for g, c, _, _ in calls] == [(False, False), (False, True), (False, True), (True, False), (True, True)]


def test_tracking_loss_is_summed_over_the_backward_views(monkeypatch):
    torch.manual_seed(0)
    model = pntrack.SelfSupervised(tiny(contrast=False))
    totals, track_loss = [], pntrack.track_loss
    monkeypatch.setattr(pntrack, "track_loss", lambda *a: (lambda r: totals.append(r[0].item()) or r)(track_loss(*a)))
    loss, terms = run_cycle(model, tiny_batch(), None)
    assert len(totals) == 2 and loss.item() == pytest.approx(sum(totals), rel=1e-6)


def test_random_query_is_a_learned_parameter_that_receives_a_gradient():
    torch.manual_seed(0)
    model = pntrack.SelfSupervised(tiny(prompt_source="random_query"))
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
    cfg = tiny(forward_search="local")
    model = pntrack.SelfSupervised(cfg).eval()
    frames, boxes = make_clip(4, (320, 180))                     # full frames larger than the letterbox
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
    cfg = tiny(forward_search="global")
    model = pntrack.SelfSupervised(cfg).eval()
    frames, _ = make_clip(4, (320, 180))                         # letterboxed into 256 x 256: 1 px there = 1.25 px
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


# --- 6. inference: the Tracker, on fixture networks whose right answer is known (conftest.py) ------------------

def test_hann_window_is_ostracks_cosine_window():
    assert torch.allclose(pntrack.hann2d(2), torch.full((1, 1, 2, 2), 0.5625))              # 0.75 x 0.75
    assert torch.allclose(pntrack.hann2d(3)[0, 0], torch.tensor([[0.25, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 0.25]]))


def test_tracker_follows_a_moving_object():
    frames, boxes = make_clip(12)
    tracker = pntrack.Tracker(BrightObjectNet(tiny(verify_move=False)), device="cpu")
    tracker.init(frames[0], boxes[0])
    iou = lambda a, b: box_iou(*(pntrack.xywh_to_cxcywh(torch.tensor(v, dtype=torch.float64)) for v in (a, b)))[0].item()
    ious = [iou(tracker.update(f), b) for f, b in zip(frames[1:], boxes[1:])]
    static = [iou(boxes[0], b) for b in boxes[1:]]
    # the object travels 66 px right and 33 px down, three times its size: the first box loses it...
    assert static[-1] == 0
    # ...and the tracker stays on it to within the crop's resampling (one search-crop pixel is < 1 image px)
    assert min(ious) > 0.9, ious


def test_tracker_follows_an_object_out_of_the_frame_keeping_its_box_10px_inside():
    frames, boxes = make_clip(10, step=(16, 0))                  # x = 10 + 16 t: the last frame shows 6 px of it
    # the head's own sizes (no size bound, no kept aspect): the box is the visible part, clipped
    tracker = pntrack.Tracker(BrightObjectNet(tiny(max_size_change=0, keep_aspect=False, verify_move=False)), device="cpu")
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
    frames, boxes = make_clip(5)                                 # the object is the brighter part in grey too
    tracker = pntrack.Tracker(BrightObjectNet(tiny(verify_move=False)), device="cpu")
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


def test_tracker_weighs_the_score_map_by_the_hann_window_and_keeps_the_nearer_peak():
    frames, boxes = make_clip(4, (300, 200), step=(0, 0))
    tracker = pntrack.Tracker(TwoPeakNet(tiny(max_size_change=0, window_power=1, search_factor=4.0)), device="cpu")
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
    frames, boxes = make_clip(2, (600, 400), step=(0, 0))
    cfg = tiny(max_size_change=0, hold_below_score=0, window_power=power, search_factor=4.0)
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
    frames, _ = make_clip(2, (600, 400))
    cfg = tiny(max_size_change=0, hold_below_score=0, keep_aspect=keep, search_factor=4.0, verify_move=False)
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
    tracker = pntrack.Tracker(pntrack.PNTrack(tiny()), device="cpu")
    with pytest.raises(ValueError, match=r"160x90"):
        tracker.init(np.zeros((90, 160, 3), np.uint8), box)


@pytest.mark.parametrize("t", [10, 100, 1000])
def test_template_memory_picks_frames_by_sstrack_formula_and_after_thinning(t):
    cfg = tiny(n_templates=3, memory_size=64)
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
    tracker = pntrack.Tracker(pntrack.PNTrack(tiny(n_templates=3, memory_size=4, hold_below_score=0)), device="cpu")
    frames, boxes = make_clip(12)
    tracker.init(frames[0], boxes[0])
    for f in frames[1:]:
        tracker.update(f)
        assert len(tracker.memory) < 8            # 2 * memory_size: thinned by half when reached
    # frames 0..7 stored, thinned to 0, 2, 4, 6 at frame 7; 8..11 added, thinned again at frame 11
    assert [n for n, _ in tracker.memory] == [0, 4, 8, 10] and tracker.frame_no == 11
    # the cached template tokens follow the thinning: only stored frames, the first one among them
    assert 0 in tracker.tokens and set(tracker.tokens) <= {n for n, _ in tracker.memory}


def test_tracker_with_cached_template_tokens_gives_the_same_boxes_and_embeds_each_template_once():
    torch.manual_seed(0)
    cfg = tiny(hold_below_score=0.0, max_size_change=0.0, verify_move=False)
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
    picks_at = lambda t: pntrack.Tracker.memory_picks(argparse.Namespace(cfg=cfg, frame_no=t))  # memory never thinned
    picked = {0} | {f for t in range(1, n + 1) for f in picks_at(t)}
    assert sum(runs[True][1]) == n + len(picked) < n * cfg.n_templates
    assert sum(runs[False][1]) == n * cfg.n_templates + n


@pytest.mark.parametrize("bound", [0.0, 0.1])
def test_max_size_change_bounds_the_per_frame_change_of_w_and_h(bound):
    frames, boxes = make_clip(4, (600, 400))
    tracker = pntrack.Tracker(ConstantNet(tiny(max_size_change=bound, hold_below_score=0, verify_move=False)), device="cpu")
    tracker.init(frames[0], boxes[0])
    sizes = [np.array(boxes[0][2:], float)] + [np.array(tracker.update(f)[2:]) for f in frames[1:]]
    ratios = [b / a for a, b in zip(sizes, sizes[1:])]
    if bound:
        assert all(np.all(r <= 1.1 + 1e-9) and np.all(r >= 1 / 1.1 - 1e-9) for r in ratios), ratios
    else:                # undamped: 0.9 of a crop 3x the box side (2.7x, less where the image edge clips it)
        assert ratios[0].min() > 2


@pytest.mark.parametrize("hold", [0.0, 0.5])
def test_hold_below_score_keeps_the_last_box_on_unsure_frames(hold):
    frames, boxes = make_clip(4)
    tracker = pntrack.Tracker(BrightObjectNet(tiny(hold_below_score=hold, verify_move=False)), device="cpu")
    tracker.init(frames[0], boxes[0])
    out = [tracker.update(f) for f in frames[1:]]          # the fixture's peak is 1: never held
    assert tracker.held == 0 and np.allclose(out[-1], boxes[-1], atol=1.5)
    unsure = pntrack.Tracker(ConstantNet(tiny(hold_below_score=hold)), device="cpu")
    unsure.init(frames[0], boxes[0])
    out = [unsure.update(f) for f in frames[1:]]           # peak 0.3: held when hold = 0.5, else it moves
    assert (unsure.held, all(np.allclose(b, boxes[0]) for b in out)) == ((3, True) if hold else (0, False))


@pytest.mark.parametrize("gate", [0.0, 0.5])
def test_memory_min_score_keeps_low_confidence_frames_out_of_the_template_memory(gate):
    frames, boxes = make_clip(5)
    tracker = pntrack.Tracker(ConstantNet(tiny(memory_min_score=gate, hold_below_score=0)), device="cpu")
    tracker.init(frames[0], boxes[0])
    for f in frames[1:]:
        tracker.update(f)
    assert [n for n, _ in tracker.memory] == ([0] if gate else [0, 1, 2, 3, 4])    # peak 0.3 < 0.5


class ShiftedNet(pntrack.PNTrack):
    """A head that always points 3 cells right of the search crop's centre (a look-alike, or background), peak 0.9,
    with the size of a box a quarter of the crop (the tracker's own box at search factor 4)."""
    def forward(self, z, x):
        B, G = x.shape[0], math.isqrt(self.n_x)
        score = torch.full((B, 1, G, G), 0.01)
        score[:, 0, G // 2, G // 2 + 3] = 0.9
        return score, torch.full((B, 2, G, G), 0.25), torch.zeros(B, 2, G, G)


def test_verify_window_reads_the_template_tokens_off_the_search_tokens():
    # a 16-px patch stem has no context, and a template crop (1.5 x the box side, 64 px) of a box centred in the
    # search crop (3 x, 128 px) samples the same pixels as the search crop's central 4 x 4 cells: the window read
    # off the search tokens at the box is the template's own tokens; one cell (16 crop px) right, likewise
    frames, boxes = make_clip(1, (300, 200), start=(140, 90))
    tracker = pntrack.Tracker(ConstantNet(tiny(stem="patch16")), device="cpu")
    image = Image.fromarray(frames[0])
    tracker.init(image, boxes[0])
    crop, tf = pntrack.crop_image(image, tracker.box, 3.0, 128)
    with torch.inference_mode():
        stem = tracker.net.patch_embed(tracker._tensor(crop)[None])                  # (1, 64, D)
        for shift in (0, 16 * tf[2]):
            box = tracker.box + np.array([shift, 0, 0, 0])
            own = tracker.net.patch_embed(tracker._template(image, box)[None])[0]     # (16, D)
            assert torch.allclose(tracker._window(stem, box, tf), own, atol=1e-4), shift
        sims = tracker._similarity(torch.stack([own, tracker._window(stem, tracker.box, tf)]))
        by_hand = F.cosine_similarity(own.flatten(), (tracker._tokens(0, tracker.first) - tracker.net.pos_z[0]).flatten(), 0)
    assert torch.isclose(sims[0], by_hand) and by_hand < 0.99 and torch.isclose(sims[1], torch.tensor(1.0))


@pytest.mark.parametrize("step, verify, margin", [(0, False, 0.0), (0, True, 0.0), (0, True, 2.0), (30, True, 0.0)])
def test_verify_move_keeps_the_box_where_a_move_would_leave_the_target(step, verify, margin):
    frames, boxes = make_clip(4, (400, 200), start=(100, 90), step=(step, 0))
    cfg = tiny(max_size_change=0, hold_below_score=0, search_factor=4.0, verify_move=verify, verify_margin=margin,
               stem="patch16")                                  # random 16-px patches: tokens differ with the pixels
    tracker = pntrack.Tracker(ShiftedNet(cfg), device="cpu")
    tracker.init(frames[0], boxes[0])
    out = np.array([tracker.update(f) for f in frames[1:]])
    # the head says "3 cells right" (a cell is 10 px here: the 80 px crop over 8 cells) every frame. Where the object
    # stays put (step 0), a template there shows background and one at the old box the object itself, so
    # verification stays -- unless the margin (2: more than any cosine difference) lets every move through; where
    # the object does move 3 cells a frame (step 30), the new box is the object and the old one background: it moves
    stays = verify and margin < 1 and step == 0
    assert tracker.held == (3 if stays else 0)
    assert np.allclose(out[:, 0] - boxes[0][0], [0, 0, 0] if stays else [30, 60, 90], atol=1e-6), out
    assert [n for n, _ in tracker.memory] == ([0] if stays else [0, 1, 2, 3])      # no template from a held frame


def test_clip_box_keeps_a_margin_inside_the_image():
    assert np.allclose(pntrack.clip_box(np.array([-50.0, 40.0, 20.0, 20.0]), 100, 80), [5, 40, 10, 20])
    assert np.allclose(pntrack.clip_box(np.array([50.0, 40.0, 300.0, 20.0]), 100, 80), [50, 40, 100, 20])
    # non-square images: x is clipped by the width, y by the height
    assert np.allclose(pntrack.clip_box(np.array([50.0, 100.0, 20.0, 20.0]), 200, 80), [50, 75, 20, 10])
    assert np.allclose(pntrack.clip_box(np.array([100.0, 50.0, 20.0, 20.0]), 80, 200), [75, 50, 10, 20])
    assert np.allclose(pntrack.clip_box(np.array([50.0, 40.0, 20.0, 300.0]), 200, 80), [50, 40, 20, 80])


def test_rescale_moves_x_and_w_with_the_width_and_y_and_h_with_the_height():
    tracker = pntrack.Tracker(ConstantNet(tiny()), device="cpu")
    tracker.init(np.zeros((36, 48, 3), np.uint8), (10, 8, 16, 12))              # centre (18, 14)
    tracker.rescale(2.0, 1.5)                                                   # 48x36 -> 96x54
    assert np.allclose(tracker.box, [36, 21, 32, 18])


def test_tracker_touches_no_dca_parameter_and_matches_a_model_built_without_dca():
    frames, boxes = make_clip(5)
    outputs = []
    for dca in (True, False):
        torch.manual_seed(0)
        model = pntrack.SelfSupervised(tiny(dca=dca, hold_below_score=0))     # always moves
        if dca:
            for p in model.dca.parameters():
                p.data.fill_(float("nan"))     # any use of a DCA parameter at inference would show as NaN
        tracker = pntrack.Tracker(model.net, device="cpu")
        tracker.init(frames[0], boxes[0])
        outputs.append(np.array([tracker.update(f) for f in frames[1:]]))
    assert np.isfinite(outputs[0]).all()
    assert np.array_equal(outputs[0], outputs[1])


def test_batchnorm_folding_keeps_outputs_and_leaves_the_network_alone():
    torch.manual_seed(0)
    net = pntrack.PNTrack(tiny())
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


def test_pointwise_computes_what_a_1x1_nn_conv2d_does():
    torch.manual_seed(0)
    x = torch.randn(2, 24, 9, 7)
    conv = torch.nn.Conv2d(24, 40, 1)
    with torch.no_grad():
        y = pntrack.pointwise(conv, x)
        assert y.shape == (2, 40, 9, 7) and torch.allclose(y, F.conv2d(x, conv.weight, conv.bias), atol=1e-5)
    x.requires_grad_(True)                                            # it trains: gradients reach input and weights
    pntrack.pointwise(conv, x).sum().backward()
    assert x.grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0


def test_network_and_tracker_give_bit_identical_results_on_1_and_2_threads():
    # ours (docs/RESULTS.md, "One result per machine"): the stem's 1x1 convs run as matrix products (`pointwise`)
    # and MKL sums every matrix product in one order on any thread count (MKL_CBWR, set when pntrack is imported),
    # so a run's boxes are the same whatever --threads is. Without either, 1 and 2 threads differ by 1e-6 to 1e-5.
    net = pntrack.load_checkpoint(track.SHIPPED_CKPT)                 # trained weights: realistic activations
    frames, gt = make_clip(30, size=(192, 144), generated=3)
    torch.manual_seed(0)
    z, x = torch.randn(1, 3, 3, 64, 64), torch.randn(1, 3, 128, 128)
    threads, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            tracker = pntrack.Tracker(net, device="cpu")
            with torch.no_grad():
                outputs = tracker.net(z, x)
            boxes = track.run_tracker(tracker, frames, gt[0])[0]
            runs.append((outputs, boxes))
    finally:
        torch.set_num_threads(threads)
    (out1, boxes1), (out2, boxes2) = runs
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))
    assert np.array_equal(boxes1, boxes2)
    assert np.ptp(boxes1[:, 0]) > 5 or np.ptp(boxes1[:, 1]) > 5      # and the box did move: a real comparison


def test_checkpoint_round_trip_restores_config_and_weights(tmp_path):
    net = pntrack.PNTrack(tiny(n_templates=2))
    pntrack.save_checkpoint(str(tmp_path / "m.pt"), net)
    back = pntrack.load_checkpoint(str(tmp_path / "m.pt"))
    assert back.cfg == net.cfg
    for (k, a), b in zip(net.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert not any(f.startswith(".tmp-") for f in os.listdir(tmp_path))
    pntrack.save_checkpoint(str(tmp_path / "no_suffix"), net)            # any file name works
    assert pntrack.load_checkpoint(str(tmp_path / "no_suffix")).cfg == net.cfg
