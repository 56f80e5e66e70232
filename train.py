"""train.py: self-supervised training of PNTrack from videos whose only label is the first-frame box.

    python train.py                                   # tiny model, generated videos, ~10 min on a 2-core CPU
    python train.py --data ~/datasets/GOT-10k/train --config pntrack-256 --pretrained dropmae.pth
    torchrun --nproc_per_node=2 train.py --data ...   # DistributedDataParallel (NCCL on GPU, gloo on CPU)

Writes OUT/pntrack.pt (weights + config, what track.py loads) and OUT/last.pt (optimizer, epoch, RNG: for
--resume), both atomically after every epoch. The method is in pntrack.py (SSTrack cycle consistency + PNTrack
DCA); this file is data, the loop and the evaluation. Data layouts: see `find_sequences`.
"""
import argparse
import copy
import functools
import math
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import replace

import av
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

import pntrack
import track

# -----------------------------------------------------------------------------
# Generated videos: the zero-setup default data. Textured objects move, scale and rotate over a textured,
# panning background, with distractors and a passing occluder. Any frame t renders directly from the clip's
# seed (trajectories are smooth closed-form functions of t), so samples never decode a whole video.


def noise(rng, w, h, cells_per_px):
    """(h, w) float32 in [0, 1]: a random grid of about w * cells_per_px cells, upscaled bicubically."""
    small = rng.random((max(2, int(h * cells_per_px)), max(2, int(w * cells_per_px))))
    return np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)) / np.float32(255)


def texture(rng, w, h, vivid, scale=1, fractal=False):
    """A random colour texture (h, w, 3) uint8: stripes, checks or blobs (or, with `fractal`, also fractal
    noise) over a random palette.

    `scale` > 1 draws it that much smaller and upscales it (backgrounds: smooth anyway, and the costliest
    part of making a sample otherwise).
    """
    if scale > 1:
        small = texture(rng, w // scale, h // scale, vivid, fractal=fractal)
        return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    palette = rng.integers(0, 256, (3, 3)).astype(np.float32)
    if vivid:      # targets and distractors: saturated colours; backgrounds stay duller
        palette = np.clip((palette - palette.mean(1, keepdims=True)) * 1.8 + 128, 0, 255)
    else:          # backgrounds: greyer and lower in contrast than the objects
        palette = palette * 0.4 + 70
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(4 if fractal else 3)
    freq = rng.uniform(0.08, 0.35) if vivid else rng.uniform(0.04, 0.24)
    if kind == 0:                                     # stripes at a random angle
        a = rng.uniform(0, np.pi)
        t = np.sin((xx * np.cos(a) + yy * np.sin(a)) * freq * 2) * 0.5 + 0.5
    elif kind == 1:                                   # checks
        t = ((np.floor(xx * freq / 2) + np.floor(yy * freq / 2)) % 2).astype(np.float32)
    elif kind == 2:                                   # smooth blobs
        t = noise(rng, w, h, freq / 3)
    else:                                             # fractal noise: octaves with amplitude ~ 1/frequency, the
        t = sum(noise(rng, w, h, freq / 3 * 2 ** o) / 2 ** o for o in range(4)) / 1.875   # spectrum of photos
    t2 = rng.random((h, w), dtype=np.float32) * 0.25   # fine grain so flat areas still have texture
    img = palette[0] * (1 - t)[..., None] + palette[1] * t[..., None] + (palette[2] - 128) * t2[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


class Sprite:
    """One moving object: a textured shape with a smooth trajectory, scale and rotation over time. `natural`
    (ours) adds fractal textures and a changing look: the texture fades towards a second one, and the aspect
    ratio breathes (a turning head, a walking person). `like`: an (h, w, 3) texture to copy (a look-alike)."""
    def __init__(self, rng, W, H, n_frames, size_range, natural=False, like=None):
        self.base = rng.uniform(*size_range) * min(W, H)             # px, side of a square of equal area
        aspect = math.exp(rng.uniform(-0.6, 0.6))
        w, h = int(self.base * math.sqrt(aspect)) + 2, int(self.base / math.sqrt(aspect)) + 2
        if like is not None:
            rgb = np.asarray(Image.fromarray(like).resize((w, h), Image.BILINEAR))
        else:
            rgb = texture(rng, w, h, vivid=True, fractal=natural)
        self.rgb = rgb
        mask = Image.new("L", (w, h), 0)
        shape = rng.integers(3)
        if shape == 0:
            ImageDraw.Draw(mask).ellipse((0, 0, w - 1, h - 1), fill=255)
        elif shape == 1:
            ImageDraw.Draw(mask).rectangle((0, 0, w - 1, h - 1), fill=255)
        else:                                          # a random convex-ish polygon
            ang = np.sort(rng.uniform(0, 2 * np.pi, 7))
            pts = [(w / 2 + w / 2 * math.cos(a), h / 2 + h / 2 * math.sin(a)) for a in ang]
            ImageDraw.Draw(mask).polygon(pts, fill=255)
        self.image = Image.fromarray(rgb).convert("RGBA")
        self.image.putalpha(mask)
        # trajectory: start point + drift + two sinusoids, folded back into the frame (a "bounce")
        self.W, self.H = W, H
        self.p0 = rng.uniform(0.2, 0.8, 2) * (W, H)
        speed = rng.uniform(0.3, 1.6) * self.base / 20                # px per frame
        a = rng.uniform(0, 2 * np.pi)
        self.drift = speed * np.array([math.cos(a), math.sin(a)])
        self.amp = rng.uniform(0, 0.15, 2) * (W, H)
        self.omega = rng.uniform(0.02, 0.08, 2)
        self.phase = rng.uniform(0, 2 * np.pi, 2)
        self.scale_amp, self.scale_omega = rng.uniform(0, 0.35), rng.uniform(0.01, 0.05)
        self.spin = rng.uniform(-1.0, 1.0) if rng.random() < 0.5 else 0.0   # degrees per frame
        self.morph = self.stretch = None
        if natural:     # (amplitude, angular frequency per frame, phase) of the look and aspect changes
            other = Image.fromarray(texture(rng, w, h, vivid=True, fractal=True)).convert("RGBA")
            other.putalpha(mask)
            self.morph = other, rng.uniform(0, 0.8), rng.uniform(0.01, 0.05)
            self.stretch = rng.uniform(0, 0.25), rng.uniform(0.02, 0.1), rng.uniform(0, 2 * np.pi)

    def centre(self, t):
        p = self.p0 + self.drift * t + self.amp * np.sin(self.omega * t + self.phase)
        lo, span = np.array([0.1, 0.1]) * (self.W, self.H), np.array([0.8, 0.8]) * (self.W, self.H)
        q = np.mod(p - lo, 2 * span)                   # fold into [lo, lo + span] like a bouncing ball
        return lo + np.where(q > span, 2 * span - q, q)

    def render(self, t):
        """RGBA image of the sprite at frame t and its top-left paste position."""
        s = math.exp(self.scale_amp * math.sin(self.scale_omega * t))
        sw = sh = s
        image = self.image
        if self.morph:                                 # fade in and out of the second texture
            other, amp, omega = self.morph
            image = Image.blend(image, other, amp * (1 - math.cos(omega * t)) / 2)
        if self.stretch:                               # w and h breathe in opposite directions
            amp, omega, phase = self.stretch
            k = math.exp(amp * math.sin(omega * t + phase))
            sw, sh = s * k, s / k
        im = image.resize((max(4, int(image.width * sw)), max(4, int(image.height * sh))), Image.BILINEAR)
        if self.spin:
            im = im.rotate(self.spin * t, resample=Image.BILINEAR, expand=True)
        c = self.centre(t)
        return im, (int(round(c[0] - im.width / 2)), int(round(c[1] - im.height / 2)))


class GeneratedVideo:
    """A procedurally generated clip; deterministic by seed. frame(t) -> RGB PIL image; box(t) -> (x, y, w, h).

    style "simple": vivid objects on a dull background. "natural" (ours, DESIGN §6, for real video): fractal
    textures, a background as colourful as the objects half the time (the target is not simply the most
    salient thing), a look-alike distractor with the target's own texture half the time, targets that change
    their look and aspect, a global illumination drift, and a blurred camera in 3 clips of 10.
    """
    def __init__(self, seed, n_frames=100, size=(320, 240), style="simple"):
        rng = np.random.default_rng(seed)
        natural = style == "natural"
        self.name, self.n = f"generated-{seed}", n_frames
        self.W, self.H = W, H = size
        vivid = natural and rng.random() < 0.5
        self.background = texture(rng, int(W * 1.5), int(H * 1.5), vivid=vivid, scale=2, fractal=natural)
        clutter = Image.fromarray(self.background)
        draw = ImageDraw.Draw(clutter)
        for _ in range(rng.integers(3, 9)):           # background clutter: dull rectangles and ellipses
            x, y = rng.integers(0, clutter.width), rng.integers(0, clutter.height)
            r = rng.integers(8, 40, 2)
            colour = tuple(int(v) for v in rng.integers(40, 200, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + r[0], y + r[1]), fill=colour)
        self.background = np.asarray(clutter)
        self.pan = rng.uniform(-0.6, 0.6, 2)          # camera pan, px per frame
        self.target = Sprite(rng, W, H, n_frames, (0.15, 0.3), natural)
        self.distractors = [Sprite(rng, W, H, n_frames, (0.06, 0.2), natural) for _ in range(rng.integers(1, 4))]
        self.occluder = None
        if rng.random() < 0.5:                        # a bar crossing the scene: partial occlusion
            self.occluder = (texture(rng, int(rng.uniform(0.06, 0.12) * W), H, vivid=False),
                             rng.uniform(-0.2, 1.0) * W, rng.uniform(-3, 3))
        self.gain, self.blur = None, 0.0
        if natural:
            if rng.random() < 0.5:                    # a look-alike in place of the first distractor
                self.distractors[0] = Sprite(rng, W, H, n_frames, (0.12, 0.3), natural, like=self.target.rgb)
            self.gain = rng.uniform(0, 0.3), rng.uniform(0.01, 0.06), rng.uniform(0, 2 * np.pi)   # brightness
            self.blur = rng.uniform(0.5, 1.5) if rng.random() < 0.3 else 0.0

    def __len__(self):
        return self.n

    def frame(self, t):
        bw, bh = self.background.shape[1] - self.W, self.background.shape[0] - self.H
        ox = int(np.mod(self.pan[0] * t + bw / 2, 2 * bw))
        oy = int(np.mod(self.pan[1] * t + bh / 2, 2 * bh))
        ox, oy = (2 * bw - ox if ox > bw else ox), (2 * bh - oy if oy > bh else oy)
        img = Image.fromarray(self.background[oy:oy + self.H, ox:ox + self.W])
        for s in self.distractors[: len(self.distractors) // 2]:     # some distractors pass behind the target
            im, pos = s.render(t)
            img.paste(im, pos, im)
        im, pos = self.target.render(t)
        img.paste(im, pos, im)
        for s in self.distractors[len(self.distractors) // 2:]:       # and some in front of it
            im, pos = s.render(t)
            img.paste(im, pos, im)
        if self.occluder is not None:
            bar, x0, v = self.occluder
            img.paste(Image.fromarray(bar), (int(x0 + v * t), 0))
        if self.gain:                                 # the light changes: the whole frame brightens and dims
            amp, omega, phase = self.gain
            g = math.exp(amp * math.sin(omega * t + phase))
            img = Image.fromarray(np.clip(np.asarray(img, np.float32) * g, 0, 255).astype(np.uint8))
        if self.blur:
            img = img.filter(ImageFilter.GaussianBlur(self.blur))
        return img

    def box(self, t):
        """Ground truth (x, y, w, h): the target's visible-or-not extent (its alpha mask's bounding box)."""
        im, (x, y) = self.target.render(t)
        x1, y1, x2, y2 = im.getchannel("A").getbbox()
        return np.array([x + x1, y + y1, x2 - x1, y2 - y1], float)

    @property
    def first_box(self):
        return pntrack.xywh_to_cxcywh(self.box(0))


# -----------------------------------------------------------------------------
# Real data. A sequence is a folder of frames with a box file, a video with a sidecar box file, or a still
# image with a sidecar box file. Whatever the layout, training reads ONE label: the first box.

BOX_FILES = ("groundtruth.txt", "groundtruth_rect.txt", "init.txt")   # GOT-10k/LaSOT/VOT, OTB, ours


def read_first_box(path):
    """The only function that reads a label: the first non-empty line of a box file -> (cx, cy, w, h).

    Later lines are never read (training uses the first-frame box only, Init.BBox supervision).
    """
    try:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():      # parse_box checks the numbers: finite, w and h > 0
                    return pntrack.xywh_to_cxcywh(track.parse_box(line, f"{path}:{i}"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file of boxes (it holds bytes that are not text)") from None
    raise ValueError(f"{path}: no box in the file")


@functools.lru_cache(maxsize=64)
def load_image(path):
    """Decode an image file to RGB. Cached: every sample of a sequence reuses its first frame (template and
    views), so with few sequences most decodes are hits. Callers never modify the returned image."""
    return track.read_image(path)


class FrameSequence:
    """Frames in a folder (or in its img/ or color/), first box from a box file."""
    def __init__(self, name, frames, box_file):
        self.name, self.frames, self.first_box = name, frames, read_first_box(box_file)
        self.resized = False            # a frame of another size than frame 0 was seen (and warned about)

    def __len__(self):
        return len(self.frames)

    def frame(self, i):
        image = load_image(self.frames[i])
        size = load_image(self.frames[0]).size
        if image.size != size:          # resized to frame 0's size, so the first box keeps its meaning
            if not self.resized:
                track.warn(f"{self.frames[i]}: frame {i + 1} is {image.width}x{image.height}, frame 1 is "
                           f"{size[0]}x{size[1]}; such frames are resized to {size[0]}x{size[1]}")
                self.resized = True
            image = image.resize(size, Image.BILINEAR)
        return image


class VideoSequence:
    """A video file (PyAV) with a sidecar `<name>.txt` holding the first box.

    Samples only use frames 0..max_gap, so the first visit decodes those once, keeps frame 0 at full size
    and the rest shrunk to the letterbox size, and an LRU cache keeps a few videos' frames.
    """
    cache = OrderedDict()
    cache_size = 4

    def __init__(self, path, box_file, max_frames, frame_size):
        self.name, self.path, self.first_box = os.path.basename(path), path, read_first_box(box_file)
        self.max_frames, self.frame_size = max_frames, frame_size
        try:
            with av.open(path) as c:
                n = c.streams.video[0].frames
        except Exception as e:
            raise ValueError(f"{path}: PyAV cannot open the video ({type(e).__name__}: {str(e)[:80]})") from None
        self.n = min(n, max_frames) if n > 0 else max_frames        # refined once decoded

    def _frames(self):
        if self.path not in self.cache:
            frames = []
            try:
                with av.open(self.path) as c:
                    for i, f in enumerate(c.decode(video=0)):
                        im = f.to_image()
                        if i > 0:
                            im.thumbnail((self.frame_size, self.frame_size))
                        frames.append(im)
                        if len(frames) >= self.max_frames:
                            break
            except av.FFmpegError as e:        # a broken file: the frames before the break are kept
                track.warn(f"{self.path}: decoding stopped after frame {len(frames)} ({e.strerror or e})")
            if not frames:
                raise ValueError(f"{self.path}: no frame could be decoded")
            self.cache[self.path] = frames
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(self.path)
        return self.cache[self.path]

    def __len__(self):
        return self.n

    def frame(self, i):
        frames = self._frames()
        self.n = len(frames)
        return frames[min(i, len(frames) - 1)]


class StillImage(FrameSequence):
    """A single image with a sidecar box file: a one-frame sequence (its forward frames are augmented copies)."""


def find_sequences(root, cfg):
    """Every sequence below `root` -> (sequences, warnings). Layouts found by walking the tree:

    - a folder with frames (directly or in img/ or color/) and groundtruth.txt / groundtruth_rect.txt /
      init.txt: GOT-10k, LaSOT (class/name/img), OTB (name/img + groundtruth_rect.txt), VOT (color/),
      UAV123 re-arranged as name/ + groundtruth.txt; boxes as x,y,w,h or 8-number VOT polygons;
    - a video (.mp4 .avi .mov .mkv) with a sidecar <name>.txt;
    - a still image with a sidecar <name>.txt.
    A sequence whose first frame or box is unusable is skipped, with a warning naming the file.
    """
    if not os.path.isdir(root):
        raise ValueError(f"--data {root}: not a folder")
    found, problems = [], []

    def add(make, where):
        try:
            seq = make()
            im = seq.frame(0)
            try:              # the tracker's own check: overlapping the first frame, not absurdly large
                pntrack.check_box(pntrack.cxcywh_to_xywh(seq.first_box), im.width, im.height)
            except ValueError as e:
                raise ValueError(f"{where}: first {e}") from None
            found.append(seq)
        except (ValueError, OSError) as e:
            problems.append(str(e))

    for folder, subdirs, files in os.walk(root, followlinks=True):     # datasets are often symlinked
        subdirs.sort()
        box_file = track.find_box_file(folder, BOX_FILES)
        frames = track.list_frames(folder) if box_file else []
        if box_file and frames:
            add(lambda: FrameSequence(os.path.relpath(folder, root), frames, box_file), box_file)
            subdirs[:] = [d for d in subdirs if d not in ("img", "color")]
            continue
        stems = {os.path.splitext(f)[0]: f for f in files if f.endswith(".txt")}
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if stem in stems and ext.lower() in track.VIDEO_EXT + track.IMAGE_EXT and f not in BOX_FILES:
                path, sidecar = os.path.join(folder, f), os.path.join(folder, stems[stem])
                if ext.lower() in track.VIDEO_EXT:
                    add(lambda: VideoSequence(path, sidecar, cfg.max_gap + 1, cfg.frame_size), path)
                else:
                    add(lambda: StillImage(os.path.relpath(path, root), [path], sidecar), path)
    return found, problems


# -----------------------------------------------------------------------------
# One training sample (DESIGN §2): the first frame's template, n_fwd later frames letterboxed to L x L, and
# n_bwd augmented search views of the first frame with the first box mapped through the augmentation.

def letterbox(image, L):
    """Fit an image into L x L (aspect kept, antialiased), black padding right/bottom -> uint8 (L, L, 3)."""
    s = L / max(image.size)
    im = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.BILINEAR)
    out = np.zeros((L, L, 3), np.uint8)
    out[:im.height, :im.width] = np.asarray(im)
    return out


def augmented_view(image, box, cfg, rng, size, factor, jitter=True):
    """A search crop of `image` around a jittered `box` (cx, cy, w, h), with shear, flip, blur and colour
    jitter (SSTrack Table 8; OSTrack's centre/scale jitter). Returns (uint8 (size, size, 3), target box
    (cx, cy, w, h) normalised to the view): the box moved exactly by the same affine map as the pixels.
    """
    w, h = box[2:]
    if jitter:
        wh = np.array([w, h]) * np.exp(rng.standard_normal(2) * cfg.scale_jitter)
        centre = box[:2] + math.sqrt(wh.prod()) * cfg.center_jitter * (rng.random(2) - 0.5)
    else:
        wh, centre = np.array([w, h]), box[:2]
    side = math.sqrt(wh.prod()) * factor
    # output px p -> input px: centre + side/size * M (p - size/2), M = flip @ shear
    shear = rng.uniform(-cfg.shear, cfg.shear, 2) if jitter else np.zeros(2)
    M = np.array([[1.0, shear[0]], [shear[1], 1.0]])
    if jitter and rng.random() < cfg.flip_prob:
        M = M @ np.diag([-1.0, 1.0])
    A = side / size * M
    affine = np.concatenate([A, (centre - A @ [size / 2, size / 2])[:, None]], 1)   # (2, 3)
    crop = Image.fromarray(pntrack.warp_image(image, affine, size))
    if jitter and rng.random() < cfg.blur_prob:
        crop = crop.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    if jitter and cfg.color_jitter > 0:
        for op in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            crop = op(crop).enhance(1 + rng.uniform(-cfg.color_jitter, cfg.color_jitter))
    # the target: the box corners through the inverse map, then their bounding box
    corners = np.array([[box[0] + sx * w / 2, box[1] + sy * h / 2] for sx in (-1, 1) for sy in (-1, 1)])
    inv = np.linalg.inv(A)
    p = (corners - affine[:, 2]) @ inv.T                              # (4, 2) in view px
    lo, hi = p.min(0), p.max(0)
    target = np.concatenate([(lo + hi) / 2, hi - lo]) / size
    return np.asarray(crop), target


def random_instance(image, rng, tries=4):
    """A random box (cx, cy, w, h) in an image: side 8-35% of the shorter image side, aspect 1:2..2:1; of
    `tries` candidates the most textured (highest grey-level std), so flat sky or water is rarely picked.
    Self-supervised trackers that follow random patches (UDT, Wang et al. CVPR 2019) use such boxes as objects."""
    W, H = image.size
    grey = np.asarray(image.convert("L").reduce(4), np.float32)          # texture measured at 1/4 size
    best, best_std = None, -1.0
    for _ in range(tries):
        side, aspect = rng.uniform(0.08, 0.35) * min(W, H), math.exp(rng.uniform(-0.7, 0.7))
        w, h = min(side * math.sqrt(aspect), W * 0.9), min(side / math.sqrt(aspect), H * 0.9)
        box = np.array([rng.uniform(w / 2, W - w / 2), rng.uniform(h / 2, H - h / 2), w, h])
        x0, y0 = int((box[0] - w / 2) / 4), int((box[1] - h / 2) / 4)
        patch = grey[y0:y0 + max(1, int(h / 4)), x0:x0 + max(1, int(w / 4))]
        if patch.size and patch.std() > best_std:
            best, best_std = box, float(patch.std())
    return best


def make_sample(seq, cfg, rng):
    """(template (3, Sz, Sz), frames (n_fwd, 3, L, L), views (n_bwd, 3, Sx, Sx), targets (n_bwd, 4), originals)
    uint8 / float tensors; originals = {"box": first box (cx, cy, w, h) px, "frames": the n_fwd full-size frames}.

    With probability cfg.extra_instances (ours, DESIGN §6) the sample starts instead at a random frame s of the
    sequence, on a random textured box (`random_instance`): every frame becomes a first frame, so a few videos
    give many instances. Its forward frames lie within max_gap of s, nearest first (either side of s).
    """
    start = 0
    if cfg.extra_instances > 0 and len(seq) > 1 and rng.random() < cfg.extra_instances:
        start = int(rng.integers(len(seq)))
        f0 = seq.frame(start)
        b0 = random_instance(f0, rng)
    else:
        f0, b0 = seq.frame(0), seq.first_box
    template, _ = pntrack.crop_image(f0, b0, cfg.template_factor, cfg.template_size)
    if len(seq) > 1:     # n_fwd other frames within max_gap of the start, nearest first (in time order for s = 0)
        near = np.array([i for i in range(max(0, start - cfg.max_gap), min(len(seq), start + cfg.max_gap + 1)) if i != start])
        idx = rng.choice(near, cfg.n_fwd, replace=len(near) < cfg.n_fwd)
        idx = idx[np.argsort(np.abs(idx - start), kind="stable")]
        full = [seq.frame(int(i)) for i in idx]
    else:                # a still image: its forward "frames" are shifted and scaled copies of itself
        full = []
        for _ in range(cfg.n_fwd):
            s = math.exp(rng.uniform(-0.3, 0.3))
            W, H = f0.size
            shift = rng.uniform(-0.15, 0.15, 2) * (W, H)
            affine = [[1 / s, 0, (W - W / s) / 2 + shift[0]], [0, 1 / s, (H - H / s) / 2 + shift[1]]]
            full.append(f0.transform(f0.size, Image.AFFINE, sum(affine, []), Image.BILINEAR))
    frames = [letterbox(im, cfg.frame_size) for im in full]
    try:
        views, targets = zip(*(augmented_view(f0, b0, cfg, rng, cfg.search_size, cfg.search_factor) for _ in range(cfg.n_bwd)))
    except np.linalg.LinAlgError:    # a box so small (1e-300 px) that the view's affine map underflows to singular
        targets = np.nan
    # NaN, inf or absurd view targets (a sub-pixel first box) would make the loss NaN: CycleData drops the sequence
    if not (np.abs(targets) < 1e3).all():
        raise ValueError(f"first box {pntrack.format_box(pntrack.cxcywh_to_xywh(b0))} gives view targets that "
                         f"are not finite numbers (is it smaller than a pixel?)")

    def chw(images):                 # (..., H, W, 3) uint8 -> (..., 3, H, W) tensor
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(images), -1, -3)))
    return (chw(template), chw(frames), chw(views), torch.tensor(np.stack(targets), dtype=torch.float32),
            {"box": np.asarray(b0, float), "frames": full})


def collate(samples):
    """Stack the tensors of a batch; the originals (full-size PIL frames of varying sizes) stay a list."""
    *tensors, originals = zip(*samples)
    return [torch.stack(t) for t in tensors] + [list(originals)]


class CycleData(torch.utils.data.Dataset):
    """`length` samples per epoch; sample i of epoch e comes from its own RNG seeded by (seed, e, i), so a
    resumed run sees the same data. Sequences that fail to read are dropped with a warning."""
    def __init__(self, sequences, cfg, length, seed):
        self.sequences, self.cfg, self.length, self.seed, self.epoch = sequences, cfg, length, seed, 0
        self.bad = set()

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        for _ in range(100):
            if self.cfg.mix_generated > 0 and rng.random() < self.cfg.mix_generated:   # ours: some generated clips
                return make_sample(GeneratedVideo(int(rng.integers(10 ** 9)), style=self.cfg.generated), self.cfg, rng)
            k = int(rng.integers(len(self.sequences)))
            if k in self.bad:
                continue
            try:
                return make_sample(self.sequences[k], self.cfg, rng)
            except (ValueError, OSError) as e:
                track.warn(f"skipping sequence {self.sequences[k].name}: {e}")     # a line, not a Python warning
                self.bad.add(k)
        raise RuntimeError("no readable sequence left in the training data")


class GeneratedSequences:
    """An endless list of generated clips: index -> GeneratedVideo(seed). Seeds below 10**9 train; the
    held-out evaluation clips use seeds from 10**9 up, so training never sees them."""
    def __init__(self, seed, n=10 ** 6, style="simple"):
        self.seed, self.n, self.style = seed, n, style

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return GeneratedVideo((self.seed * 1_000_003 + i) % 10 ** 9, style=self.style)


def held_out_clips(n, n_frames=60, style="simple"):
    """The evaluation clips: the same generator, seeds that training never draws."""
    return [GeneratedVideo(10 ** 9 + i, n_frames, style=style) for i in range(n)]


# -----------------------------------------------------------------------------
# Evaluation: the inference Tracker on held-out clips, success AUC next to a static-box baseline.

def evaluate_tracker(net, clips, device):
    """Mean success AUC over clips of the tracker and of the baseline that never moves the first box.

    The Tracker works on its own eval-mode copy of `net`, so this can run in the middle of training.
    Returns (mean AUC, mean static AUC, per-clip AUCs, per-clip static AUCs).
    """
    tracker = pntrack.Tracker(net, device=device)
    ours, static = [], []
    for clip in clips:
        gt = np.stack([clip.box(t) for t in range(len(clip))])
        boxes, _, _ = track.run_tracker(tracker, (clip.frame(t) for t in range(len(clip))), gt[0],
                                        name=getattr(clip, "name", None))
        ours.append(track.evaluate(boxes, gt)["auc"])
        static.append(track.evaluate(np.repeat(gt[:1], len(gt), 0), gt)["auc"])
    return float(np.mean(ours)), float(np.mean(static)), ours, static


class LabelledSequence:
    """A --val sequence for evaluation (all its ground truth is read, unlike training data)."""
    def __init__(self, folder, box_file):
        self.name, self.frames, self.gt = os.path.basename(folder), track.list_frames(folder), track.read_boxes(box_file)
        if len(self.gt) < len(self.frames):
            raise ValueError(f"{box_file}: {len(self.gt)} boxes for {len(self.frames)} frames")
        try:                            # the box the tracker starts from, checked as track.py checks it
            pntrack.check_box(self.gt[0], *load_image(self.frames[0]).size)
        except ValueError as e:
            raise ValueError(f"{box_file}, first line: {e}") from None

    def __len__(self):
        return len(self.frames)

    def frame(self, t):
        try:
            return load_image(self.frames[t])
        except ValueError as e:         # a broken later frame: the tracker repeats its box there
            track.warn(f"{e}; repeating the last box")
            return None

    def box(self, t):
        return self.gt[t]


TRACKER_FIELDS = ("n_templates", "memory_size", "memory_min_score", "max_size_change", "hold_below_score",
                  "window_power", "keep_aspect", "readout_power", "move_full_score")      # inference only


# The real-data split (README "Real video"): chosen once, by name, before any sequence was scored.
TEST_SEQUENCES = ("otb_Crossing", "otb_Girl", "vot15_bag")      # ../shared/data/sequences: never trained on


def real_split(root):
    """ROOT = ../shared/data -> {"train": [...], "val": [...], "test": [...]} sequence folders. Rule: in each of
    ROOT/pool and ROOT/pool2, sort the names; every 4th (indices 3, 7, 11, ...) is validation, the rest trains;
    of ROOT/sequences the three TEST_SEQUENCES are the test set and the other five train; ROOT/pool3 (issue 24:
    new objects) trains, all of it, so validation and test stay exactly as they were."""
    def folders(sub):
        d = os.path.join(root, sub)
        return sorted(os.path.join(d, n) for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))) if os.path.isdir(d) else []
    pool, pool2, pool3, dev = folders("pool"), folders("pool2"), folders("pool3"), folders("sequences")
    if not pool and not pool2 and not pool3 and not dev:
        raise ValueError(f"--make-split: {root} has no pool/, pool2/, pool3/ or sequences/ folders of sequences")
    val = pool[3::4] + pool2[3::4]
    test = [f for f in dev if os.path.basename(f) in TEST_SEQUENCES]
    train = [f for f in pool + pool2 if f not in val] + [f for f in dev if f not in test] + pool3
    return {"train": train, "val": val, "test": test}


def make_split(root, out):
    """Symlink the split's folders into OUT/train, OUT/val, OUT/test (the data itself is never copied)."""
    for part, folders in real_split(root).items():
        os.makedirs(os.path.join(out, part), exist_ok=True)
        for f in folders:
            link = os.path.join(out, part, os.path.basename(f))
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(f), link)
        print(f"{os.path.join(out, part)}: {len(folders)} sequences")


def find_val_sequences(root):
    out = []
    for folder, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        box_file = track.find_box_file(folder)
        if box_file and track.list_frames(folder):
            try:
                out.append(LabelledSequence(folder, box_file))
            except (ValueError, OSError) as e:       # one bad sequence is skipped, not the end of the run
                track.warn(f"--val: skipping {e}")
    if not out:
        raise ValueError(f"--val {root}: no sequence folders (frames + groundtruth.txt) found")
    return out


# -----------------------------------------------------------------------------
# Explain: figures of one training step. `python train.py --explain DIR` runs one prompt-mode and one
# noise-mode cycle on a small batch with `SelfSupervised.record` switched on and draws the tensors the code
# computed in that step (nothing is re-derived for the pictures): cycle.png, prompt.png, noise.png; then
# curves.png from a train.log, and tracking.gif: the inference Tracker on a held-out generated clip. Pillow only.

# a colour map for heat maps, dark to bright (black, purple, red, orange, pale yellow: like matplotlib's inferno)
HEAT_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
GREEN, RED, CYAN = (0, 220, 0), (255, 40, 40), (0, 230, 255)      # target, prediction, chosen token cells


def to_picture(image):
    """A normalised (3, S, S) network input -> the RGB picture the network saw (PIL)."""
    mean = torch.tensor(pntrack.IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(pntrack.IMAGENET_STD).view(3, 1, 1) * 255
    rgb = (image.float().cpu() * std + mean).clamp(0, 255).round().byte()       # (3, S, S) uint8
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def heat(values, under):
    """A map over the G x G search grid ((G*G,) or (1, G, G)) -> a picture the size of `under`: scaled to
    [0, its max], coloured, upsampled with nearest neighbour (one square per token), over `under` in grey."""
    v = values.float().cpu().reshape(-1).numpy()
    G = math.isqrt(len(v))
    pos = (v / max(float(v.max()), 1e-12) * (len(HEAT_COLOURS) - 1)).reshape(G, G)   # (G, G) in [0, 4]
    i = np.minimum(pos.astype(int), len(HEAT_COLOURS) - 2)
    rgb = HEAT_COLOURS[i] + (HEAT_COLOURS[i + 1] - HEAT_COLOURS[i]) * (pos - i)[..., None]   # (G, G, 3)
    im = Image.fromarray(rgb.astype(np.uint8)).resize(under.size, Image.NEAREST)
    return Image.blend(under.convert("L").convert("RGB"), im, 0.75)


def draw_box(image, box, colour):
    """Draw a normalised (cx, cy, w, h) box on a square picture, in place; returns the picture."""
    x1, y1, x2, y2 = (pntrack.cxcywh_to_xyxy(torch.as_tensor(box).float().cpu()) * image.width).tolist()
    ImageDraw.Draw(image).rectangle([x1, y1, x2, y2], outline=colour, width=2)
    return image


def outline_cells(image, cells, G, colour=CYAN):
    """Outline cells of the G x G search grid given by flat row-major indices (as topk_gather and box_mask
    count them), in place; returns the picture."""
    c, draw = image.width / G, ImageDraw.Draw(image)
    for j in cells.tolist():
        row, col = divmod(j, G)
        draw.rectangle([col * c, row * c, (col + 1) * c - 1, (row + 1) * c - 1], outline=colour, width=2)
    return image


def sheet(title, rows, col=150, caption=30):
    """Lay out a figure: `rows` of (picture or text, caption) cells under a `title`. Pictures are centred in
    columns `col` px wide, below their caption (two lines at most); a text cell is written as it is."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(cell):                                      # (width, height) a cell takes
        if isinstance(cell, Image.Image):
            return col, cell.height
        return max(measure.textlength(s) for s in cell.split("\n")) + 10, 12 * (cell.count("\n") + 1)
    top = 16 + 12 * (title.count("\n") + 1)
    heights = [caption + max(size(c)[1] for c, _ in row) + 12 for row in rows]
    image = Image.new("RGB", (int(max(sum(size(c)[0] for c, _ in row) for row in rows)) + 20, top + sum(heights)), "white")
    draw = ImageDraw.Draw(image)
    draw.multiline_text((10, 8), title, fill="black", spacing=2)
    y = top
    for row, h in zip(rows, heights):
        x = 10
        for cell, text in row:
            draw.multiline_text((x, y), text, fill="black", spacing=2)
            if isinstance(cell, Image.Image):
                image.paste(cell, (int(x + (col - 16 - cell.width) / 2), y + caption))
            else:
                draw.multiline_text((x, y + caption), cell, fill="black", spacing=2)
            x += size(cell)[0]
        y += h
    return image


def save_small(image, path):
    """PNG with a 256-colour palette: a third of the size of RGB for these textured pictures."""
    image.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


def cycle_figure(rec, batch, first, cfg, samples, title):
    """The cycle of `samples`: first frame and box, forward frames with their predicted boxes, the templates
    cut there, the backward views with target and prediction, and each sample's loss terms."""
    _, _, views, targets = batch
    steps = rec["steps"]
    fwd, bwd = steps[:cfg.n_fwd], steps[cfg.n_fwd:]               # the order the cycle ran its steps in
    where = "whole frame" if cfg.forward_search == "global" else "search crop"
    rows = []
    for b in samples:
        frame, box = first[b]                                    # full first frame, its box (cx, cy, w, h) px
        s = cfg.search_size / max(frame.size)
        f0 = Image.fromarray(letterbox(frame, cfg.search_size))
        draw_box(f0, torch.as_tensor(box) * s / cfg.search_size, GREEN)
        top = [(f0, f"sample {b}: first frame f0\nand its box (the only label)")]
        top += [(draw_box(to_picture(st["x"][b]), st["box"][b], RED), f"forward {t + 1}: {where}\npredicted box (no loss)")
                for t, st in enumerate(fwd)]
        text, bottom = [], [(to_picture(fwd[0]["z"][b, 0]), "template z0\n(forward's template)")]
        bottom += [(to_picture(bwd[0]["z"][b, t]), f"template z{t + 1}: cut at\nforward {t + 1}'s box")
                   for t in range(cfg.n_fwd)]
        for v, st in enumerate(bwd):
            total, focal, giou, l1 = pntrack.track_loss(st["score"][b:b + 1], st["size"][b:b + 1], st["offset"][b:b + 1],
                                                        targets[b:b + 1, v])
            iou = pntrack.box_iou(st["box"][b], targets[b, v])[0].item()
            view = draw_box(draw_box(to_picture(pntrack.normalize(views[b, v])), targets[b, v], GREEN), st["box"][b], RED)
            ctx = f"{int(st['n_ctx'])} context tokens" if st["n_ctx"] else "no context"
            top.append((view, f"backward view {v + 1}: target green\n{ctx}, IoU {iou:.2f}"))
            bottom.append((heat(st["score"][b], view.resize((64, 64))), f"view {v + 1}: score map C"))
            text.append(f"view {v + 1}: {total.item():.2f} = focal {focal.item():.2f} + 2 x GIoU {giou.item():.2f}"
                        f"\n          + 5 x L1 {l1.item():.3f}; IoU {iou:.2f}")
        terms = dict(zip(pntrack.TERMS, rec["terms"].tolist()))
        text.append(f"batch: contrast {terms['contrast']:.2f}, noise decoder {terms['noise']:.2f}, "
                    f"loss {terms['loss']:.2f}")
        rows += [top, bottom + [("\n".join(text), f"sample {b}'s tracking loss L = sum over views")]]
    return sheet(title, rows)


def prompt_figure(rec, cfg, b, title):
    """Prompt mode, sample b, one row per forward step: the search image, a, C, s = a * C and the top-Kt cells
    -- exactly the indices kernels.topk_gather returned in that step (record "prompt_idx")."""
    G, rows = math.isqrt(rec["steps"][0]["feats"].shape[1]), []
    for t, st in enumerate(rec["steps"][:cfg.n_fwd]):
        x, cells = to_picture(st["x"][b]), st["prompt_idx"][b]
        to = f"forward step {t + 2}" if t + 1 < cfg.n_fwd else "backward views 2..n"
        row = [(outline_cells(draw_box(x.copy(), st["box"][b], RED), cells, G),
                f"forward {t + 1} search, box red\n{int(st['n_ctx'])} prompts in (context)")]
        if "a" in st:
            row.append((heat(st["a"][b], x), f"a: template->search attn.\n(last block, mean of heads)"))
        row += [(heat(st["score"][b], x), "C: class (score) map"),
                (outline_cells(heat(st["s"][b], x), cells, G), f"s = a x C, the top {len(cells)}\ncells: prompts")]
        row.append((f"the {len(cells)} search tokens under the\ncyan cells, detached, are the\ncontext of {to}",
                    f"cells {sorted(cells.tolist())}"))
        rows.append(row)
    return sheet(title, rows)


def noise_figure(rec, cfg, receivers, title):
    """Noise mode: for sample i, the other sequence's last forward search with the Kt background cells it gave,
    and sample i's view 2 (which carries them) with the main head's and the noise decoder's score maps."""
    G, last, view = math.isqrt(rec["steps"][0]["feats"].shape[1]), rec["steps"][cfg.n_fwd - 1], rec["steps"][cfg.n_fwd + 1]
    rows = []
    for i in receivers:
        j, cells = int(last["noise_src"][i]), last["noise_idx"][i]
        src = outline_cells(draw_box(to_picture(last["x"][j]), last["box"][j], RED), cells, G)
        x = to_picture(view["x"][i])
        rows.append([(src, f"sample {j}, forward {cfg.n_fwd}: its box,\n{len(cells)} background cells"),
                     (draw_box(x.copy(), view["box"][i], RED), f"sample {i}, view 2, with\nthose {len(cells)} as context"),
                     (heat(view["score"][i], x), "main head: score map C"),
                     (heat(view["noise_score"][i], x), "noise decoder's head:\nscore map"),
                     (f"sample {j}'s background tokens, outside\nits predicted box, go to sample {i}\n"
                      f"(batch rolled by one); the noise decoder\nlearns to track through them", "")])
    return sheet(title, rows)


LOG_LINE = re.compile(r"^epoch (\d+)/\d+ step (\d+)/(\d+) \| (.*?) \| dca (\S+)")


def read_train_log(path):
    """OUT/train.log -> {"x": progress in epochs (n,), "epoch": (n,), "mode": [n DCA modes], term: (n,) per TERMS}.

    Each progress line holds the means since the line before. A resumed run repeats the interrupted epoch: its
    lines replace the earlier ones; a new run appended to the same log (not a resume) starts afresh.
    """
    points, prev = {}, ""
    with open(path) as f:
        for line in f:
            if line.startswith("config ") and not prev.startswith("resuming"):
                points = {}
            m = LOG_LINE.match(line)
            if m:
                epoch, step, steps = int(m[1]), int(m[2]), int(m[3])
                words = m[4].split()
                points[epoch, step] = (epoch - 1 + step / steps, epoch, m[5], dict(zip(words[::2], map(float, words[1::2]))))
            prev = line
    rows = [points[k] for k in sorted(points)]
    out = {"x": np.array([r[0] for r in rows]), "epoch": np.array([r[1] for r in rows]), "mode": [r[2] for r in rows]}
    out.update({n: np.array([r[3].get(n, np.nan) for r in rows]) for n in pntrack.TERMS})
    return out


CURVES = (("loss", "total loss L"), ("focal", "focal (weight 1)"), ("giou", "1 - GIoU (weight 2)"),
          ("l1", "L1 (weight 5)"), ("contrast", "instance contrast"), ("noise", "noise decoder's loss"),
          ("iou", "IoU of the backward views"))


def curves_figure(log):
    """Each loss term and the backward-view IoU over training, from a train.log; a dashed line where DCA
    switches from prompts to noise (epoch K)."""
    d = read_train_log(log)
    if not len(d["x"]):
        raise ValueError(f"{log}: no progress lines (`epoch E/N step S/M | ...`) to plot")
    # K: the last epoch before the first noise-mode line (hard schedule; the soft one starts its ramp there)
    K = next((e - 1 for e, m in zip(d["epoch"], d["mode"]) if m == "noise"), None)
    W, H, cols = 270, 215, 4
    image = Image.new("RGB", (cols * W, 2 * H + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), f"training curves from {log}: one point per progress line (the mean over the steps "
              f"since the line before); x: epochs", fill="black")

    def nice(v):                                          # the round number >= v the y axis ends at
        e = 10 ** math.floor(math.log10(v)) if v > 0 else 1
        return next(m * e for m in (1, 2, 2.5, 5, 10) if m * e >= v)
    x1 = 5 * math.ceil(d["x"].max() / 5)                   # whole epochs on the ticks
    for k, (name, title) in enumerate(CURVES):
        left, top = (k % cols) * W + 50, 30 + (k // cols) * H + 28
        rect = (left, top, left + W - 66, top + H - 78)
        y1 = 1.0 if name == "iou" else nice(np.nanmax(d[name]))
        track.draw_plot(draw, rect, [(None, d["x"], d[name])], (0, x1), (0, y1), title, "epoch")
        if K is not None:                                 # dashed: the DCA switch
            px = rect[0] + (rect[2] - rect[0]) * K / x1
            for y in range(rect[1], rect[3], 8):
                draw.line([px, y, px, min(y + 4, rect[3])], fill=(40, 90, 220))
            draw.text((px + 3, rect[1] + 2), f"K={K}", fill=(40, 90, 220))
    left, top = (len(CURVES) % cols) * W + 20, 30 + H + 28
    note = ("dashed (blue): epoch K, where DCA switches\nfrom prompts (epochs <= K) to noise\n(epochs > K)"
            if K is not None else "no noise-mode line in this log:\nno DCA switch to mark")
    draw.multiline_text((left, top), note + "\n\nfocal, GIoU, L1, IoU: mean over the backward\nviews; L: their "
                        "weighted sum over the views\n+ contrast + noise decoder's loss (0 in\nprompt mode)",
                        fill="black", spacing=3)
    return image


def tracking_gif(path, net, device, n_clips, size=160, n_frames=40):
    """The inference Tracker on the held-out generated clip with the median AUC among the first n_clips
    (the clips `python train.py` evaluates on): n_frames spread over the clip, `size` px wide, with the ground
    truth (green) and the tracker's box (red)."""
    clips = held_out_clips(n_clips, style=net.cfg.generated)
    _, _, aucs, _ = evaluate_tracker(net, clips, device)
    k = int(np.argsort(aucs)[len(aucs) // 2])
    clip = clips[k]
    gt = np.stack([clip.box(t) for t in range(len(clip))])
    boxes, _, _ = track.run_tracker(pntrack.Tracker(net, device=device), (clip.frame(t) for t in range(len(clip))), gt[0])
    frames, s = [], size / clip.W
    for t in np.linspace(0, len(clip) - 1, min(n_frames, len(clip))).round().astype(int):
        im = clip.frame(t).resize((size, round(clip.H * s)), Image.BILINEAR)
        track.draw_boxes(im, boxes[t] * s, gt[t] * s)
        frames.append(im)
    # one 64-colour palette for all frames (a third of the bytes of a palette per frame), box colours included
    source = Image.new("RGB", (size * (len(frames[::8]) + 1), frames[0].height), GREEN)
    for i, im in enumerate(frames[::8]):
        source.paste(im, (size * i, 0))
    source.paste(Image.new("RGB", (size // 2, frames[0].height), (255, 40, 40)), (size * len(frames[::8]), 0))
    palette = source.quantize(64, dither=Image.Dither.NONE)
    frames = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=150, loop=0, optimize=True)
    return clip.name, aucs[k], float(np.mean(aucs))


def repo_path(path):
    """A file's name for figure titles: relative to the repository when it lies inside it (the same on every
    machine), else as given."""
    repo = os.path.dirname(os.path.abspath(__file__))
    rel = os.path.relpath(os.path.abspath(path), repo)
    return path if rel.startswith("..") else rel


def explain(out_dir, ckpt=None, data=None, log=None, cfg=None, batch_size=4, n_clips=16, seed=0, device=None):
    """Write the figures of one training step to out_dir (see this section's header). ckpt: a pntrack.pt (the
    DCA weights come from a last.pt beside it, if there is one); None: an untrained network of `cfg`. data: a
    --data folder, default generated videos. log: a train.log for curves.png (skipped if None).
    Returns the records of the prompt-mode and the noise-mode step and the batch (for the tests)."""
    os.makedirs(out_dir, exist_ok=True)
    device = pntrack.pick_device(device)
    net = pntrack.load_checkpoint(ckpt) if ckpt else None
    # the figures show the method: DCA on, prompts scored by attention x class map, whatever the run's flags
    cfg = replace(net.cfg if net else cfg or pntrack.make_config("tiny"), dca=True, prompt=True, noise=True,
                  prompt_source="attn*cls")
    torch.manual_seed(seed)
    model = pntrack.SelfSupervised(cfg)
    weights = "untrained network"
    if net:
        model.net.load_state_dict(net.state_dict())
        weights, last = repo_path(ckpt), os.path.join(os.path.dirname(ckpt), "last.pt")
        try:                                  # the noise decoder and the context type embedding live there
            state = torch.load(last, map_location="cpu", weights_only=True)["model"]
            model.dca.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("dca.")})
            weights += f" (DCA parts from {repo_path(last)})"
        except (OSError, KeyError, RuntimeError):
            weights += f" (DCA parts untrained: no usable {repo_path(last)} beside it)"
    print(f"explain: {weights}")
    tracked = copy.deepcopy(model.net)       # for tracking.gif: the steps below update BatchNorm's running stats
    model.to(device).train()                   # train mode, as in a training step (BatchNorm batch statistics)
    # a batch as the loader makes it, from sequences we keep, to draw their first frames too
    sequences = find_sequences(data, cfg)[0] if data else GeneratedSequences(seed, style=cfg.generated)
    if not sequences:
        raise ValueError(f"--data {data}: no usable sequence found")
    rng = np.random.default_rng(seed)
    seqs = [sequences[int(rng.integers(len(sequences)))] for _ in range(batch_size)]
    samples = [make_sample(s, cfg, np.random.default_rng([seed, i])) for i, s in enumerate(seqs)]
    *batch, originals = collate(samples)
    first = [(s.frame(0), o["box"]) for s, o in zip(seqs, originals)]
    records = {}
    with torch.no_grad():
        for mode in ("prompt", "noise"):
            model.record = {}
            _, terms = model(*[t.to(device) for t in batch], mode=mode, originals=originals)
            records[mode] = {"steps": [{k: v.cpu() for k, v in st.items()} for st in model.record["steps"]],
                             "terms": terms.cpu()}
    model.record = None
    name = f"weights: {weights}"
    figures = {
        "cycle.png": cycle_figure(records["noise"], batch, first, cfg, samples=range(min(2, batch_size)),
                                  title=f"One training step (noise mode): SSTrack's cycle with DCA. {name}\nGreen: "
                                  f"the first box (in a view: moved by the augmentation, the target); red: predicted"),
        "prompt.png": prompt_figure(records["prompt"], cfg, 0, f"DCA prompt mode (epochs <= K), sample 0, each forward "
                                    f"step. {name}"),
        "noise.png": noise_figure(records["noise"], cfg, range(min(2, batch_size)), f"DCA noise mode (epochs > K). {name}"),
    }
    if log:
        figures["curves.png"] = curves_figure(log)
    else:
        print("explain: no train.log found: curves.png skipped (give --log PATH)")
    for file, image in figures.items():
        save_small(image, os.path.join(out_dir, file))
    clip, auc, mean = tracking_gif(os.path.join(out_dir, "tracking.gif"), tracked, device, n_clips)
    print(f"explain: tracking.gif is held-out clip {clip}, success AUC {auc:.3f}: the median of {n_clips} "
          f"(their mean {mean:.3f})")
    for file in sorted(list(figures) + ["tracking.gif"]):
        path = os.path.join(out_dir, file)
        print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")
    return records, batch


# -----------------------------------------------------------------------------
# The loop

def load_resume(path, model, optimizer, device, rng=True):
    """--resume: weights, optimizer moments (and the torch RNG) from `path` -> its dict. ValueError: no such file;
    truncated, corrupt, or from another config / code version."""
    if not os.path.exists(path):
        raise ValueError(f"--resume: {path} does not exist (no earlier run in --out {os.path.dirname(path)})")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if rng:
            torch.set_rng_state(state["rng"])
    except Exception as e:
        raise ValueError(f"--resume: {path} cannot be resumed from ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:150]})") from None
    return state


# -----------------------------------------------------------------------------
# MAE pre-training (`--mae`): the backbone learns to fill in hidden patches of video frames before any
# tracking (pntrack.MaskedAutoencoder). Its output, OUT/mae.pt, is in MAE's own format: `--pretrained` loads it.

def mae_frames(sequences, max_frames=3000, side=360):
    """Frames to cut MAE crops from: evenly spaced frames of every sequence (at most max_frames in all), each
    shrunk so its longer side is at most `side` px, kept in memory (decoded once)."""
    total = sum(len(s) for s in sequences)
    stride = max(1, math.ceil(total / max_frames))
    frames = []
    for seq in sequences:
        for i in range(0, len(seq), stride):
            image = seq.frame(i).copy()
            image.thumbnail((side, side), Image.BILINEAR)
            frames.append(image)
    return frames


def mae_crop(image, rng, size):
    """A random square crop of an image, side 15-70% of sqrt(W*H), resized to size x size, flipped half the
    time: objects at about the scales the tracker's search crops show them -> (3, size, size) uint8 tensor."""
    W, H = image.size
    side = math.sqrt(W * H) * rng.uniform(0.15, 0.7)
    box = (rng.uniform(0, W), rng.uniform(0, H), side, side)
    crop, _ = pntrack.crop_image(image, box, 1.0, size)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)


def pretrain_mae(args, cfg, sequences):
    """The `--mae` stage: MAE on crops of --data's frames (or of generated videos without --data); AdamW with
    MAE's betas and weight decay, 5% warm-up, then a cosine decay; OUT/mae.pt after each epoch, OUT/mae_last.pt
    (weights, optimizer, epoch) for --resume. Returns the exit code."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise ValueError("--mae runs in one process (start it with python, not torchrun)")
    if cfg.stem != "patch16":
        raise ValueError(f"--mae pre-trains the patch16 stem's ViT; stem {cfg.stem} starts from ImageNet weights "
                         f"(add --stem patch16)")
    device, log = pntrack.pick_device(args.device), make_log(args.out)
    torch.manual_seed(args.seed)
    epochs = args.epochs or 20
    per_epoch, batch = args.samples_per_epoch or 4096, args.batch_size or 64
    steps = per_epoch // batch
    model = pntrack.MaskedAutoencoder(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or 1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    base_lr = optimizer.param_groups[0]["lr"]
    out_path, last_path = os.path.join(args.out, "mae.pt"), os.path.join(args.out, "mae_last.pt")
    start_epoch = 1
    if args.resume:
        state = load_resume(last_path, model, optimizer, device, rng=False)
        start_epoch = state["epoch"] + 1
        log(f"resuming MAE from {last_path}: epoch {state['epoch']} done")
    if isinstance(sequences, GeneratedSequences):
        frames = None                                    # generated: a fresh clip and frame for every crop
    else:
        frames = mae_frames(sequences)
    log(f"MAE pre-training of the {cfg.name} backbone: {epochs} epochs x {steps} steps x {batch} crops of "
        f"{cfg.search_size} px, 75% of patches hidden; frames: "
        f"{len(frames) if frames else 'generated'}; device {device}")
    start, total = time.time(), (epochs - start_epoch + 1) * steps
    warm = max(1, int(0.05 * epochs * steps))                            # warm-up steps
    for epoch in range(start_epoch, epochs + 1):
        model.train()
        for step in range(1, steps + 1):
            rng = np.random.default_rng([args.seed, epoch, step])       # a resumed run sees the same crops
            done = (epoch - 1) * steps + step
            lr = base_lr * (done / warm if done < warm else 0.5 * (1 + math.cos(math.pi * (done - warm) / (epochs * steps - warm))))
            for g in optimizer.param_groups:
                g["lr"] = lr
            if frames is None:
                clips = [sequences[int(rng.integers(len(sequences)))] for _ in range(batch)]
                images = [c.frame(int(rng.integers(len(c)))) for c in clips]
            else:
                images = [frames[int(rng.integers(len(frames)))] for _ in range(batch)]
            x = pntrack.normalize(torch.stack([mae_crop(im, rng, cfg.search_size) for im in images]).to(device))
            with pntrack.autocast(device):
                loss, _, _ = model(x)
            if not torch.isfinite(loss):
                log(f"error: MAE loss is not finite at epoch {epoch} step {step}; stopping ({out_path} is the "
                    f"last good epoch's)")
                return 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % args.log_every == 0 or step == steps:
                elapsed = time.time() - start
                n = (epoch - start_epoch) * steps + step
                log(f"mae epoch {epoch}/{epochs} step {step}/{steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                    f"{n * batch / elapsed:.1f} crops/s | ETA {duration(elapsed / n * (total - n))}")
        pntrack.atomic_save({"model": model.state_dict()}, out_path)
        pntrack.atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}, last_path)
        if args.max_minutes and time.time() - start > args.max_minutes * 60 and epoch < epochs:
            log(f"--max-minutes {args.max_minutes} reached after MAE epoch {epoch}: {out_path} saved; "
                f"--resume continues with epoch {epoch + 1}")
            return 0
    log(f"MAE done in {duration(time.time() - start)}: {out_path} (load it with --pretrained {out_path})")
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description="Self-supervised training of PNTrack (first-frame box only).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("--data", help="folder of sequences/videos (see find_sequences); default: generated videos")
    p.add_argument("--val", help="folder of labelled sequences to evaluate on (default: held-out generated clips)")
    p.add_argument("--config", default="tiny", choices=list(pntrack.PRESETS))
    p.add_argument("--epochs", type=int, help="default: the preset's")
    p.add_argument("--samples-per-epoch", type=int, help="default: the preset's")
    p.add_argument("--batch-size", type=int, help="per process; default: the preset's")
    p.add_argument("--lr", type=float, help="head/decoder learning rate; backbone uses lr * lr_backbone_mult")
    p.add_argument("--lr-drop-epoch", type=int, help="lr / 10 after this epoch (default: the preset's)")
    p.add_argument("--out", default="out", help="folder for pntrack.pt, last.pt and train.log")
    p.add_argument("--pretrained", help="MAE / DropMAE ViT-B checkpoint for the backbone, or a pntrack.pt to start from")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--mae", action="store_true",
                   help="instead of tracking: pre-train the backbone as a masked autoencoder on crops of the --data "
                        "frames (no labels; generated videos without --data) and write OUT/mae.pt for --pretrained; "
                        "defaults here: 20 epochs x 4096 crops, batch 64, lr 1e-3")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, help="stop (and save) once this much time has passed")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--eval-clips", type=int, default=16, help="held-out generated clips to evaluate on (0: none)")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: 0 on CPU, 4 on GPU)")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    p.add_argument("--make-split", metavar="DIR", help="with --data ../shared/data: link its sequences into "
                   "DIR/train, DIR/val, DIR/test by the README's rule (real_split), then exit")
    p.add_argument("--export", metavar="PATH", help="write OUT/pntrack.pt with fp16 weights and the preset's "
                   "tracker settings to PATH (how assets/pntrack-tiny.pt is made), then exit")
    p.add_argument("--explain", metavar="DIR", help="draw the figures of one training step (cycle, DCA prompts, "
                   "DCA noise), the training curves and a tracked clip into DIR (see `explain`), then exit")
    p.add_argument("--ckpt", help="with --explain: the weights to draw (default: OUT/pntrack.pt if it exists, "
                   "else assets/pntrack-tiny.pt, else an untrained network)")
    p.add_argument("--log", help="with --explain: the train.log to plot (default: the one beside --ckpt, "
                   "else OUT/train.log)")
    g = p.add_argument_group("DCA and cycle-consistency switches (the paper's ablations)")
    g.add_argument("--no-dca", action="store_true", help="no context tokens at all (SSTrack)")
    g.add_argument("--no-prompt", action="store_true", help="no prompt tokens in epochs <= K")
    g.add_argument("--no-noise", action="store_true", help="no noise tokens/decoder in epochs > K")
    g.add_argument("--prompt-source", choices=["attn*cls", "cls", "random_query"], help="how prompts are picked")
    g.add_argument("--tokens", type=int, help="context token length Kt (paper: 8)")
    g.add_argument("--dca-epoch", type=int, help="K: prompt mode up to this epoch, noise mode after")
    g.add_argument("--dca-schedule", choices=["hard", "soft"], help="hard switch at K, or a linear ramp around it")
    g.add_argument("--no-contrast", action="store_true", help="drop the instance contrastive loss")
    g.add_argument("--grad-through-crop", action="store_true",
                   help="let the backward loss reach forward boxes (needs --template-crop batched and --forward-search global)")
    g.add_argument("--template-crop", choices=["full", "batched"],
                   help="backward templates re-cropped from full frames (SSTrack) or one batched crop of letterboxes")
    g = p.add_argument_group("real-video options for the tiny model (ours, DESIGN §6; measured in the README)")
    g.add_argument("--forward-search", choices=["global", "local"],
                   help="forward branch: whole frame (SSTrack) or a search crop around the last box")
    g.add_argument("--first-template", action="store_true",
                   help="backward template 1 = the first frame's crop (as at inference) instead of forward step 1's")
    g.add_argument("--max-gap", type=int, help="forward frames within this many frames of the first (default 400)")
    g.add_argument("--extra-instances", type=float, help="share of samples that follow a random box instead of the first box")
    g.add_argument("--mix-generated", type=float, help="with --data: share of samples from generated videos")
    g.add_argument("--stem", choices=list(pntrack.STEMS),
                   help="image -> tokens: the papers' 16-px patch embedding, or ImageNet-pretrained EfficientNet-Lite0 "
                        "blocks (default: the preset's; tiny: effnet-lite0)")
    g.add_argument("--stem-lr-mult", type=float, help="effnet-lite0: lr of its pretrained part = lr * this (0: frozen)")
    g.add_argument("--stem-bn", choices=["frozen", "train"], help="effnet-lite0: BatchNorm statistics kept or updated")
    g.add_argument("--stem-freeze-epochs", type=int, help="effnet-lite0: its pretrained part is not updated in epochs <= N")
    g.add_argument("--generated", choices=["simple", "natural"],
                   help="generated videos: simple shapes, or natural-looking ones (see GeneratedVideo)")
    return p.parse_args(argv)


def config_from_args(args):
    over = dict(epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size,
                lr=args.lr, lr_drop_epoch=args.lr_drop_epoch, prompt_source=args.prompt_source, n_tokens=args.tokens, dca_epoch=args.dca_epoch,
                dca_schedule=args.dca_schedule, template_crop=args.template_crop, forward_search=args.forward_search,
                max_gap=args.max_gap, extra_instances=args.extra_instances, mix_generated=args.mix_generated,
                generated=args.generated, stem=args.stem, stem_lr_mult=args.stem_lr_mult,
                stem_freeze_epochs=args.stem_freeze_epochs,
                stem_frozen_bn=None if args.stem_bn is None else args.stem_bn == "frozen")
    over = {k: v for k, v in over.items() if v is not None}
    for flag, field in (("no_dca", "dca"), ("no_prompt", "prompt"), ("no_noise", "noise"), ("no_contrast", "contrast")):
        if getattr(args, flag):
            over[field] = False
    if args.first_template:
        over["first_template"] = True
    if args.grad_through_crop:
        over["grad_through_crop"] = True
        over.setdefault("template_crop", "batched")      # the only differentiable crop
    return pntrack.make_config(args.config, **over)


def make_optimizer(model, cfg):
    """AdamW; the backbone (everything in the network but its head) at lr * lr_backbone_mult (DESIGN §5); an
    effnet-lite0 stem's ImageNet part in its own group at lr * stem_lr_mult, or, at 0, frozen: no gradient at all
    (so no backward pass through it)."""
    stem = model.net.patch_embed.pretrained() if cfg.stem == "effnet-lite0" else []
    if cfg.stem_lr_mult == 0:
        for p in stem:
            p.requires_grad_(False)
    ids = {id(p) for p in stem}
    backbone = [p for n, p in model.net.named_parameters() if not n.startswith("head.") and id(p) not in ids]
    ids |= {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": backbone, "lr_scale": cfg.lr_backbone_mult}, {"params": rest, "lr_scale": 1.0}]
    if stem and cfg.stem_lr_mult > 0:
        groups.append({"params": stem, "lr_scale": cfg.stem_lr_mult, "stem": True})
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def set_lr(optimizer, cfg, epoch):
    """Step decay: lr / 10 after lr_drop_epoch (PNTrack/SSTrack: after epoch 120 of 150); the stem's group at 0
    while epoch <= stem_freeze_epochs."""
    for g in optimizer.param_groups:
        frozen = g.get("stem", False) and epoch <= cfg.stem_freeze_epochs
        g["lr"] = 0.0 if frozen else cfg.lr * g["lr_scale"] * (0.1 if epoch > cfg.lr_drop_epoch else 1.0)


def duration(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def export(args):
    """--export PATH: OUT/pntrack.pt as fp16 weights with the preset's current tracker settings."""
    src = os.path.join(args.out, "pntrack.pt")
    if not os.path.isfile(src):
        raise ValueError(f"--export: {src} does not exist (train first, or give --out)")
    net = pntrack.load_checkpoint(src)
    # the tracker's settings (not the weights) follow the preset as it is now (DESIGN §6, chosen on validation)
    preset = pntrack.make_config(net.cfg.name)
    net.cfg = pntrack.replace(net.cfg, **{k: getattr(preset, k) for k in TRACKER_FIELDS})
    pntrack.save_checkpoint(args.export, net, half=True)
    print(f"wrote {args.export} ({os.path.getsize(args.export) / 1e6:.1f} MB, fp16) from {src}, tracker "
          f"settings of the {net.cfg.name} preset: " + ", ".join(f"{k} {getattr(net.cfg, k)}" for k in TRACKER_FIELDS))
    return 0


def run_explain(args):
    """--explain DIR: the figures, from --ckpt (else OUT/pntrack.pt, else the shipped weights) and its train.log."""
    ckpt = args.ckpt or next((p for p in (os.path.join(args.out, "pntrack.pt"), track.SHIPPED_CKPT)
                              if os.path.isfile(p)), None)
    logs = [os.path.join(os.path.dirname(ckpt), "train.log")] if ckpt else []
    log = next((p for p in logs + [os.path.join(args.out, "train.log")] if os.path.isfile(p)), None)
    if args.log and not os.path.isfile(args.log):
        raise ValueError(f"--log {args.log}: no such file")
    explain(args.explain, ckpt=ckpt, data=args.data, log=args.log or log, cfg=config_from_args(args),
            seed=args.seed, n_clips=max(args.eval_clips, 1), device=args.device)
    return 0


def load_data(args, cfg):
    """Training sequences (--data, else generated videos) and what to evaluate on (--val, else held-out clips)."""
    if args.data:
        sequences, problems = find_sequences(args.data, cfg)
        for msg in problems:
            print(f"warning: skipping {msg}", file=sys.stderr)
        if not sequences:
            raise ValueError(f"--data {args.data}: no usable sequence found (a folder of frames with "
                             f"groundtruth.txt / groundtruth_rect.txt / init.txt, or video/image + <name>.txt)")
    else:
        sequences = GeneratedSequences(args.seed, style=cfg.generated)
    val = find_val_sequences(args.val) if args.val else held_out_clips(args.eval_clips, style=cfg.generated)
    return sequences, val


def setup_process(args):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: then every process trains on its own share of each epoch and
    DDP averages the gradients (NCCL between GPUs, gloo between CPU processes). -> (distributed, rank, world, device)"""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    device = pntrack.pick_device(args.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return distributed, rank, world, device


def build_model(args, cfg, device, log):
    """Network + DCA, its starting weights and the optimizer -> (model, optimizer, first epoch); raises ValueError
    for weights that cannot be used. Starts: --resume (OUT/last.pt), --pretrained, or fresh (an effnet-lite0 stem
    then loads its ImageNet weights)."""
    model = pntrack.SelfSupervised(cfg).to(device)
    if cfg.stem == "effnet-lite0" and not args.pretrained and not args.resume:
        path = pntrack.stem_weights_file()
        used, unused = pntrack.load_stem_weights(model.net.patch_embed, path)
        log(f"stem effnet-lite0: {len(used)} ImageNet tensors loaded ({path}); "
            f"{len(unused)} unused (blocks {pntrack.STEM_BLOCKS}-15, conv head, classifier)")
    if args.pretrained:
        try:
            missing, unexpected = pntrack.load_pretrained(model.net, args.pretrained)
        except ValueError as e:
            raise ValueError(f"--pretrained {e}") from None
        log(f"pretrained {args.pretrained}: missing {len(missing)} keys (head: trained from scratch), "
            f"unused {len(unexpected)} ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
    optimizer = make_optimizer(model, cfg)
    start_epoch = 1
    # --resume: weights, optimizer moments, RNG and the last finished epoch; the data of an epoch is a
    # function of (seed, epoch, index), so the resumed run sees exactly what an uninterrupted one would
    if args.resume:
        last_path = os.path.join(args.out, "last.pt")
        state = load_resume(last_path, model, optimizer, device)
        start_epoch = state["epoch"] + 1
        log(f"resuming from {last_path}: epoch {state['epoch']} done")
    return model, optimizer, start_epoch


def main(argv=None):
    """Train; returns the exit code (0 done, 1 stopped on a non-finite loss, 2 bad input). One line per mode:"""
    args = parse_args(argv)
    try:
        if args.make_split:
            make_split(args.data or os.path.join("..", "shared", "data"), args.make_split)
            return 0
        if args.export:
            return export(args)
        if args.explain:
            return run_explain(args)
        cfg = config_from_args(args)
        os.makedirs(args.out, exist_ok=True)
        sequences, val = load_data(args, cfg)
        if args.mae:
            return pretrain_mae(args, cfg, sequences)
        return train(args, cfg, sequences, val)
    except ValueError as e:       # bad input ends here: one line, exit code 2 (single bad sequences are skipped)
        print(f"error: {e}", file=sys.stderr)
        return 2


def make_log(out, main_process=True):
    """The progress lines also go to OUT/train.log, so nothing is lost with the terminal (rank 0 only)."""
    def log(msg):
        if main_process:
            print(msg, flush=True)
            with open(os.path.join(out, "train.log"), "a") as f:
                f.write(msg + "\n")
    return log


def train(args, cfg, sequences, val):
    """The training run: setup, the loop over epochs (checkpoints after each), the final evaluation."""
    distributed, rank, world, device = setup_process(args)
    main_process = rank == 0       # only rank 0 prints, writes checkpoints and evaluates
    log = make_log(args.out, main_process)
    # the torch seed drives weight init, drop-path and the noise-token draws; the data has its own seeds
    torch.manual_seed(args.seed + rank)
    model, optimizer, start_epoch = build_model(args, cfg, device, log)
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "pntrack.pt")
    log(f"config {cfg.name}: {sum(p.numel() for p in model.net.parameters()) / 1e6:.1f}M parameters at inference, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M in training (DCA included), stem {cfg.stem}; "
        f"data: {args.data or 'generated videos'} ({len(sequences)} sequences); device {device}, {world} process(es)")
    # the whole cycle (3 forward + 2 backward steps) is one forward of SelfSupervised, so DDP sees one call
    # per step; parameters a DCA mode leaves idle (the noise decoder in prompt mode) need find_unused
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
    data = CycleData(sequences, cfg, cfg.samples_per_epoch, args.seed)
    indices = list(range(rank, cfg.samples_per_epoch, world))     # each process its own share of the epoch
    # on a 2-core CPU a loader process only takes time from the model (measured: 11.6 vs 12.6 samples/s)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=indices, num_workers=workers,
                                         drop_last=True, persistent_workers=False, collate_fn=collate)
    steps = len(loader)
    if steps == 0:
        raise ValueError(f"--samples-per-epoch {cfg.samples_per_epoch} gives no full batch of {cfg.batch_size} per process")
    start, done_steps, total_steps, stopped = time.time(), 0, steps * (cfg.epochs - start_epoch + 1), False

    for epoch in range(start_epoch, cfg.epochs + 1):
        data.epoch = epoch
        set_lr(optimizer, cfg, epoch)
        model.train()
        sums, count = torch.zeros(len(pntrack.TERMS)), 0
        for step, (template, frames, views, targets, originals) in enumerate(loader, 1):
            # DCA mode of this batch: prompts up to epoch K, noise after (or the soft ramp); the same on all ranks
            mode = pntrack.dca_mode(cfg, epoch, step_seed=[args.seed, epoch, step])
            batch = [t.to(device, non_blocking=True) for t in (template, frames, views, targets)]
            with pntrack.autocast(device):
                loss, terms = ddp(*batch, mode=mode, originals=originals)
            # a non-finite loss stops every rank together, before the update could spoil the weights
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)
            if distributed:
                dist.all_reduce(bad)
            if bad.item() > 0:
                log(f"error: loss is not finite at epoch {epoch} step {step} ({dict(zip(pntrack.TERMS, terms.tolist()))}); "
                    f"stopping. The last good checkpoint is {best_path} (epoch {epoch - 1}).")
                return 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)     # 0.1, as SSTrack/OSTrack
            optimizer.step()
            sums, done_steps, count = sums + terms.detach().float().cpu(), done_steps + 1, count + 1
            if step % args.log_every == 0 or step == steps:
                elapsed = time.time() - start
                avg, sums, count = sums / max(count, 1), torch.zeros_like(sums), 0
                log(f"epoch {epoch}/{cfg.epochs} step {step}/{steps} | "
                    + " ".join(f"{n} {v:.3f}" for n, v in zip(pntrack.TERMS, avg.tolist()))
                    + f" | dca {mode or 'off'} | {done_steps * cfg.batch_size * world / elapsed:.1f} samples/s"
                    + f" | ETA {duration(elapsed / done_steps * (total_steps - done_steps))}")
            # --max-minutes: stop mid-epoch with the weights saved; last.pt keeps the previous epoch as done
            if args.max_minutes and time.time() - start > args.max_minutes * 60:
                stopped = True
                break
        if main_process:
            # pntrack.pt first: last.pt claims the epoch only once both files hold it
            pntrack.save_checkpoint(best_path, model.net)
            pntrack.atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "epoch": epoch - 1 if stopped else epoch, "rng": torch.get_rng_state(),
                                 "config": vars(args)}, last_path)
        if stopped:
            log(f"--max-minutes {args.max_minutes} reached during epoch {epoch}: saved {best_path}; "
                f"--resume restarts epoch {epoch}")
            break
        if main_process and val and args.eval_every and epoch % args.eval_every == 0 and epoch < cfg.epochs:
            auc, base, _, _ = evaluate_tracker(model.net, val, device)
            log(f"epoch {epoch}: success AUC {auc:.3f} (static-box baseline {base:.3f})")

    if main_process and val:       # the final check: the inference Tracker (no DCA) on what training never saw
        auc, base, ours, static = evaluate_tracker(model.net, val, device)
        if args.val:                   # a handful of real sequences: show each one
            for seq, a, b in zip(val, ours, static):
                log(f"  {seq.name}: success AUC {a:.3f} (static-box baseline {b:.3f})")
        log(f"done in {duration(time.time() - start)}: success AUC {auc:.3f} on "
            f"{args.val or f'{len(val)} held-out generated clips'} (static-box baseline {base:.3f}); checkpoint {best_path}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
