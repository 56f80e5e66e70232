"""extras/synth.py: generated videos, the zero-setup default data of `python train.py` (no download) and its
held-out evaluation clips. Textured objects move, scale and rotate over a textured, panning background, with
distractors and a passing occluder. Any frame t renders directly from the clip's seed (trajectories are smooth
closed-form functions of t), so samples never decode a whole video.

    video = GeneratedVideo(seed=3, style="natural")
    video.frame(10)        # an RGB PIL image
    video.box(10)          # the target's ground truth (x, y, w, h); video.first_box: (cx, cy, w, h)
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import pntrack


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
# What train.py draws from: an endless list of training clips, and the held-out clips it evaluates on

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
