"""train.py: self-supervised training of PNTrack from videos whose only label is the first-frame box.

    python train.py                                   # tiny model, generated videos, ~10 min on a 2-core CPU
    python train.py --data ~/datasets/GOT-10k/train --config pntrack-256 --pretrained dropmae.pth
    torchrun --nproc_per_node=2 train.py --data ...   # DistributedDataParallel (NCCL on GPU, gloo on CPU)

Writes OUT/pntrack.pt (weights + config, what track.py loads) and OUT/last.pt (optimizer, epoch, RNG: for
--resume), both atomically after every epoch. The method is in pntrack.py (SSTrack cycle consistency + PNTrack
DCA); this file is data, the loop and the evaluation. Data layouts: see `find_sequences`. The other modes live in
extras/: generated videos (synth), --mae (mae), the figures of --explain (explain), --make-split (split).
"""
import argparse
import copy
import math
import os
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageEnhance, ImageFilter

import extras.explain
import pntrack
import track
from extras import mae, media, split, synth

# -----------------------------------------------------------------------------
# Real data. A sequence is a folder of frames with a box file, a video with a sidecar box file, or a still
# image with a sidecar box file. Whatever the layout, training reads ONE label: the first box (media.read_first_box).

class FrameSequence:
    """Frames in a folder (or in its img/ or color/), first box from a box file."""
    def __init__(self, name, frames, box_file):
        self.name, self.frames, self.first_box = name, frames, media.read_first_box(box_file)
        self.resized = False            # a frame of another size than frame 0 was seen (and warned about)

    def __len__(self):
        return len(self.frames)

    def frame(self, i):
        image = media.load_image(self.frames[i])
        size = media.load_image(self.frames[0]).size
        if image.size != size:          # resized to frame 0's size, so the first box keeps its meaning
            if not self.resized:
                media.warn(f"{self.frames[i]}: frame {i + 1} is {image.width}x{image.height}, frame 1 is "
                           f"{size[0]}x{size[1]}; such frames are resized to {size[0]}x{size[1]}")
                self.resized = True
            image = image.resize(size, Image.BILINEAR)
        return image


class VideoSequence:
    """A video file (PyAV) with a sidecar `<name>.txt` holding the first box.

    Samples only use frames 0..max_gap, so the first visit decodes those once (`media.first_video_frames`: frame 0
    at full size, the rest shrunk to the letterbox size), and an LRU cache keeps a few videos' frames.
    """
    cache = OrderedDict()
    cache_size = 4

    def __init__(self, path, box_file, max_frames, frame_size):
        self.name, self.path, self.first_box = os.path.basename(path), path, media.read_first_box(box_file)
        self.max_frames, self.frame_size = max_frames, frame_size
        n = media.video_frame_count(path)
        self.n = min(n, max_frames) if n > 0 else max_frames        # refined once decoded

    def _frames(self):
        if self.path not in self.cache:
            self.cache[self.path] = media.first_video_frames(self.path, self.max_frames, self.frame_size)
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
        box_file = media.find_box_file(folder, media.BOX_FILES)
        frames = media.list_frames(folder) if box_file else []
        if box_file and frames:
            add(lambda: FrameSequence(os.path.relpath(folder, root), frames, box_file), box_file)
            subdirs[:] = [d for d in subdirs if d not in ("img", "color")]
            continue
        stems = {os.path.splitext(f)[0]: f for f in files if f.endswith(".txt")}
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if stem in stems and ext.lower() in media.VIDEO_EXT + media.IMAGE_EXT and f not in media.BOX_FILES:
                path, sidecar = os.path.join(folder, f), os.path.join(folder, stems[stem])
                if ext.lower() in media.VIDEO_EXT:
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
                clip = synth.GeneratedVideo(int(rng.integers(10 ** 9)), style=self.cfg.generated)
                return make_sample(clip, self.cfg, rng)
            k = int(rng.integers(len(self.sequences)))
            if k in self.bad:
                continue
            try:
                return make_sample(self.sequences[k], self.cfg, rng)
            except (ValueError, OSError) as e:
                media.warn(f"skipping sequence {self.sequences[k].name}: {e}")     # a line, not a Python warning
                self.bad.add(k)
        raise RuntimeError("no readable sequence left in the training data")


# -----------------------------------------------------------------------------
# Explain (`--explain DIR`): what one training step computes, drawn by extras/explain.py

def explain(out_dir, ckpt=None, data=None, log=None, cfg=None, batch_size=4, n_clips=16, seed=0, device=None):
    """Figures into out_dir: one prompt-mode and one noise-mode step on a batch of the data pipeline above (cycle,
    prompt, noise .png; curves.png from `log`, a train.log, if given) and the inference Tracker on the held-out clip
    with the median AUC of the first n_clips (tracking.gif). ckpt: a pntrack.pt, DCA weights from a last.pt beside
    it; None: an untrained network of `cfg`. data: a --data folder, default generated videos.
    Returns the records of the prompt-mode and the noise-mode step and the batch (for the tests)."""
    os.makedirs(out_dir, exist_ok=True)
    device = pntrack.pick_device(device)
    model, weights = extras.explain.load_model(ckpt, cfg, seed)        # DCA on, whatever the run's flags
    cfg = model.cfg
    tracked = copy.deepcopy(model.net)       # for tracking.gif: the steps below update BatchNorm's running stats
    # a batch as the loader makes it, from sequences we keep, to draw their first frames too
    sequences = find_sequences(data, cfg)[0] if data else synth.GeneratedSequences(seed, style=cfg.generated)
    if not sequences:
        raise ValueError(f"--data {data}: no usable sequence found")
    rng = np.random.default_rng(seed)
    seqs = [sequences[int(rng.integers(len(sequences)))] for _ in range(batch_size)]
    *batch, originals = collate([make_sample(s, cfg, np.random.default_rng([seed, i])) for i, s in enumerate(seqs)])
    # each first frame letterboxed as the whole-frame forward search sees it, the scale to that, its box in px
    first = [(Image.fromarray(letterbox(f, cfg.search_size)), cfg.search_size / max(f.size), o["box"])
             for f, o in zip((s.frame(0) for s in seqs), originals)]
    records = extras.explain.record_steps(model, batch, originals, device)
    files = extras.explain.write_figures(out_dir, records, batch, first, cfg, weights, log)
    clips = synth.held_out_clips(n_clips, style=cfg.generated)
    _, _, aucs, _ = track.evaluate_tracker(tracked, clips, device)
    k = int(np.argsort(aucs)[len(aucs) // 2])                          # the clip with the median AUC
    clip, gt = clips[k], np.stack([clips[k].box(t) for t in range(len(clips[k]))])
    boxes, _, _ = track.run_tracker(pntrack.Tracker(tracked, device=device),
                                    (clip.frame(t) for t in range(len(clip))), gt[0])
    extras.explain.tracking_gif(os.path.join(out_dir, "tracking.gif"), clip, boxes, gt)
    print(f"explain: tracking.gif is held-out clip {clip.name}, success AUC {aucs[k]:.3f}: the median of {n_clips} "
          f"(their mean {float(np.mean(aucs)):.3f})")
    for file in sorted(files + ["tracking.gif"]):
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


def make_log(out, main_process=True):
    """The progress lines also go to OUT/train.log, so nothing is lost with the terminal (rank 0 only)."""
    def log(msg):
        if main_process:
            print(msg, flush=True)
            with open(os.path.join(out, "train.log"), "a") as f:
                f.write(msg + "\n")
    return log


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


def make_loader(args, cfg, sequences, rank, world, device):
    """The training samples (CycleData) and their DataLoader: each process its own share of every epoch."""
    data = CycleData(sequences, cfg, cfg.samples_per_epoch, args.seed)
    indices = list(range(rank, cfg.samples_per_epoch, world))     # each process its own share of the epoch
    # on a 2-core CPU a loader process only takes time from the model (measured: 11.6 vs 12.6 samples/s)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=indices, num_workers=workers,
                                         drop_last=True, persistent_workers=False, collate_fn=collate)
    if len(loader) == 0:
        raise ValueError(f"--samples-per-epoch {cfg.samples_per_epoch} gives no full batch of {cfg.batch_size} per process")
    return data, loader


def train_epoch(ddp, optimizer, loader, epoch, args, cfg, device, log, clock):
    """One epoch of training steps, a progress line every --log-every steps (the means since the line before).

    ddp: the model (in DistributedDataParallel under torchrun); clock: {"start": time.time() of the run, "done" and
    "total": its steps}, for samples/s and the ETA. -> "done", "stopped" (--max-minutes passed) or "not finite"
    (the loss: logged, and no update from it, on every rank).
    """
    distributed = isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    world, steps = dist.get_world_size() if distributed else 1, len(loader)
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
                f"stopping. The last good checkpoint is {os.path.join(args.out, 'pntrack.pt')} (epoch {epoch - 1}).")
            return "not finite"
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip)     # 0.1, as SSTrack/OSTrack
        optimizer.step()
        sums, count = sums + terms.detach().float().cpu(), count + 1
        clock["done"] += 1
        if step % args.log_every == 0 or step == steps:
            elapsed, done = time.time() - clock["start"], clock["done"]
            avg, sums, count = sums / max(count, 1), torch.zeros_like(sums), 0
            log(f"epoch {epoch}/{cfg.epochs} step {step}/{steps} | "
                + " ".join(f"{n} {v:.3f}" for n, v in zip(pntrack.TERMS, avg.tolist()))
                + f" | dca {mode or 'off'} | {done * cfg.batch_size * world / elapsed:.1f} samples/s"
                + f" | ETA {duration(elapsed / done * (clock['total'] - done))}")
        # --max-minutes: stop mid-epoch with the weights saved; last.pt keeps the previous epoch as done
        if args.max_minutes and time.time() - clock["start"] > args.max_minutes * 60:
            return "stopped"
    return "done"


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
    data, loader = make_loader(args, cfg, sequences, rank, world, device)
    clock = {"start": time.time(), "done": 0, "total": len(loader) * (cfg.epochs - start_epoch + 1)}

    for epoch in range(start_epoch, cfg.epochs + 1):
        data.epoch = epoch
        set_lr(optimizer, cfg, epoch)
        model.train()
        status = train_epoch(ddp, optimizer, loader, epoch, args, cfg, device, log, clock)
        if status == "not finite":
            return 1
        stopped = status == "stopped"
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
            auc, base, _, _ = track.evaluate_tracker(model.net, val, device)
            log(f"epoch {epoch}: success AUC {auc:.3f} (static-box baseline {base:.3f})")

    if main_process and val:       # the final check: the inference Tracker (no DCA) on what training never saw
        auc, base, ours, static = track.evaluate_tracker(model.net, val, device)
        if args.val:                   # a handful of real sequences: show each one
            for seq, a, b in zip(val, ours, static):
                log(f"  {seq.name}: success AUC {a:.3f} (static-box baseline {b:.3f})")
        log(f"done in {duration(time.time() - clock['start'])}: success AUC {auc:.3f} on "
            f"{args.val or f'{len(val)} held-out generated clips'} (static-box baseline {base:.3f}); checkpoint {best_path}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


# -----------------------------------------------------------------------------
# Command line

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
    g.add_argument("--drop-path", type=float, help="stochastic depth, max rate (tiny: 0; the ViT-B presets: 0.1)")
    g.add_argument("--generated", choices=["simple", "natural"],
                   help="generated videos: simple shapes, or natural-looking ones (see GeneratedVideo)")
    return p.parse_args(argv)


def config_from_args(args):
    over = dict(epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size,
                lr=args.lr, lr_drop_epoch=args.lr_drop_epoch, prompt_source=args.prompt_source, n_tokens=args.tokens, dca_epoch=args.dca_epoch,
                dca_schedule=args.dca_schedule, template_crop=args.template_crop, forward_search=args.forward_search,
                max_gap=args.max_gap, extra_instances=args.extra_instances, mix_generated=args.mix_generated,
                generated=args.generated, stem=args.stem, stem_lr_mult=args.stem_lr_mult,
                stem_freeze_epochs=args.stem_freeze_epochs, drop_path=args.drop_path,
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
        sequences = synth.GeneratedSequences(args.seed, style=cfg.generated)
    val = media.find_val_sequences(args.val) if args.val else synth.held_out_clips(args.eval_clips, style=cfg.generated)
    return sequences, val


TRACKER_FIELDS = ("n_templates", "memory_size", "memory_min_score", "max_size_change", "hold_below_score",
                  "window_power", "keep_aspect", "verify_move", "verify_margin")


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


def main(argv=None):
    """Train; returns the exit code (0 done, 1 stopped on a non-finite loss, 2 bad input). One line per mode:"""
    args = parse_args(argv)
    try:
        if args.make_split:
            split.make_split(args.data or os.path.join("..", "shared", "data"), args.make_split)
            return 0
        if args.export:
            return export(args)
        if args.explain:
            return run_explain(args)
        cfg = config_from_args(args)
        os.makedirs(args.out, exist_ok=True)
        sequences, val = load_data(args, cfg)
        if args.mae:
            return mae.pretrain_mae(args, cfg, sequences, make_log(args.out), load_resume, duration)
        return train(args, cfg, sequences, val)
    except ValueError as e:       # bad input ends here: one line, exit code 2 (single bad sequences are skipped)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
