"""track.py: run PNTrack on a video, a GIF, a frame folder, a benchmark sequence or a whole dataset.

    python track.py                                            # the demo: the clip in assets/, out/demo.*
    python track.py video.mp4 --box x,y,w,h --out boxes.txt --save tracked.mp4
    python track.py video.mp4 --show                           # no box: draw it in a window, watch it track
    python track.py ../shared/data/sequences/otb_Girl          # box and ground truth from groundtruth.txt
    python track.py ../shared/data/sequences --out results/    # every sequence: a score table and the mean

Inputs are streamed frame by frame (PyAV for videos, Pillow for GIFs and image files), so a long video is
never held in memory. Result files have one `x,y,w,h` line per frame, the given box first: the format of
OTB / GOT-10k / LaSOT results. Whenever ground truth is present the run is scored with the benchmark
metrics below, and every run ends with its speed (model alone, and end to end).

This file is the benchmark metrics (identical to the got10k toolkit's OTB / GOT-10k definitions), the tracking
loop (train.py evaluates with both: `evaluate_tracker`) and the command line. Reading the inputs is in
extras/media.py, the pictures (--save, --plot) in extras/drawing.py, the windows (--select, --show) in
extras/window.py.
"""
import argparse
import itertools
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

import pntrack
from extras import drawing, media, window
from extras.media import BadInput, warn

DEFAULT_CKPT = os.path.join("out", "pntrack.pt")     # what `python train.py` writes (in the current folder)
SHIPPED_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "pntrack-tiny.pt")  # in the repo
PROGRESS_EVERY = 100                                 # frames between progress lines on stderr
# `python track.py` with no input: a Big Buck Bunny excerpt, its first box in bunny.txt beside it (README: Demo)
DEMO_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bunny.mp4")
DEMO_OUT = os.path.join("out", "demo")               # the demo writes out/demo.txt and out/demo.gif


# -----------------------------------------------------------------------------
# Metrics, as in the got10k toolkit (got10k/utils/metrics.py, experiments/otb.py and got10k.py).
# Boxes are (x, y, w, h). Frames whose ground truth is missing (NaN) or has zero size are skipped.

def rect_iou(a, b):
    """Per-row IoU of (N, 4) (x, y, w, h) boxes."""
    x1, y1 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x2 = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    y2 = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    inter = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.clip(inter / (union + np.finfo(float).eps), 0.0, 1.0)


def center_error(a, b, normalize=False):
    """Distance between box centres in pixels, or (LaSOT's normalised precision) in units of the GT size."""
    d = (a[:, :2] + a[:, 2:] / 2) - (b[:, :2] + b[:, 2:] / 2)
    if normalize:
        d = d / np.maximum(b[:, 2:], 1.0)
    return np.sqrt((d ** 2).sum(1))


IOU_THRESHOLDS = np.linspace(0, 1, 21)     # OTB success plot: 21 thresholds 0, 0.05, ..., 1
PIXEL_THRESHOLDS = np.arange(0, 51)        # OTB precision plot: 0..50 px
NORM_THRESHOLDS = np.linspace(0, 0.5, 51)  # LaSOT normalised precision plot


def evaluate(pred, gt):
    """Benchmark scores of one sequence's (N, 4) predictions against (N, 4) ground truth.

    auc: OTB success AUC = mean over 21 thresholds t of the share of frames with IoU > t (strict, as in
         got10k and the OTB toolkit, so even a perfect track scores 20/21 = 0.952);
    precision: share of frames with centre error <= 20 px; norm_precision: normalised error <= 0.2 (LaSOT);
    ao, sr50, sr75: GOT-10k's mean IoU and shares of IoU > 0.5 / 0.75, without the given first frame.
    """
    pred, gt = np.asarray(pred, float), np.asarray(gt, float)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predicted boxes for {len(gt)} ground-truth boxes")
    valid = np.isfinite(gt).all(1) & (gt[:, 2] > 0) & (gt[:, 3] > 0)
    with np.errstate(over="ignore", invalid="ignore"):   # absurdly large ground truth: IoU 0, no numpy warning
        ious = rect_iou(pred[valid], gt[valid])
        errors = center_error(pred[valid], gt[valid])
        norm_errors = center_error(pred[valid], gt[valid], normalize=True)

    def mean(a):                                      # over frames; 0 when there is none (no warning, no NaN)
        return a.sum(0) / max(len(a), 1)
    success_curve = mean(ious[:, None] > IOU_THRESHOLDS[None])
    precision_curve = mean(errors[:, None] <= PIXEL_THRESHOLDS[None])
    norm_curve = mean(norm_errors[:, None] <= NORM_THRESHOLDS[None])
    later = ious[1:] if valid[0] else ious            # GOT-10k leaves out the first (given) frame
    return dict(auc=success_curve.mean(), precision=precision_curve[20], norm_precision=norm_curve[20],
                ao=mean(later), sr50=mean(later > 0.5), sr75=mean(later > 0.75),
                success_curve=success_curve, precision_curve=precision_curve, frames=int(valid.sum()))


SCORES = ("auc", "precision", "norm_precision", "ao", "sr50", "sr75")
SCORE_NAMES = ("AUC", "Prec@20", "NPrec", "AO", "SR0.5", "SR0.75")    # the benchmarks' column names


def format_scores(s):
    """One line of scores in percent, e.g. `AUC 61.2  Prec@20 80.5  ...  (140 frames with ground truth)`."""
    text = "  ".join(f"{name} {100 * s[key]:.1f}" for key, name in zip(SCORES, SCORE_NAMES))
    return f"{text}  ({s['frames']} frames with ground truth)"


# -----------------------------------------------------------------------------
# The tracking loop

def image_size(image):
    """(width, height) of a PIL image or an (H, W, ...) array; None for anything else."""
    if isinstance(image, Image.Image):
        return image.size
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else None


def run_tracker(tracker, frames, box, on_frame=None, name=None, box_from=None):
    """Track through an iterable of images from `box` (x, y, w, h) in the first.

    A frame may be None (it could not be decoded): its box is the previous one and the network skips it.
    A frame of another size than the one before it: the tracker's box is rescaled with it (warned once).
    `on_frame(i, image, box)`, if given, sees every frame and its box (to draw, save, show, report progress);
    its time is left out of the total, which counts decoding, cropping, the network and box decoding.
    If it returns True the run stops there (--show: the user pressed q): the boxes so far are returned.
    name: the input, for warnings; box_from: where the box came from (`--box 1,2,3,4`), for errors.
    Returns (boxes (N, 4) with the given box first, seconds in total, seconds in the network).
    """
    start, outside = time.perf_counter(), 0.0          # outside: seconds spent in on_frame
    tracker.model_seconds = 0.0
    box = tuple(float(v) for v in box)                 # plain floats, so error messages read (x, y, w, h)
    boxes, size, resized = [], None, False             # size: (W, H) of the last decoded frame
    for i, image in enumerate(frames):
        if i == 0:
            if image is None:
                raise BadInput("the first frame could not be decoded")
            try:
                tracker.init(image, box)
            except ValueError as e:                    # not finite, zero-size, outside the image, absurdly large
                raise BadInput(f"{box_from}: {e}" if box_from else str(e)) from None
            boxes.append(np.array(box))
            size = image_size(image)
        elif image is None:
            boxes.append(boxes[-1])
        else:
            new = image_size(image)
            if size and new and new != size:           # keep the box in the coordinates of the new frames
                if not resized:
                    warn(f"{name + ': ' if name else ''}frame {i + 1} is {new[0]}x{new[1]}, earlier frames were "
                         f"{size[0]}x{size[1]}; the box is rescaled to the new size")
                tracker.rescale(new[0] / size[0], new[1] / size[1])
                size, resized = new, True
            boxes.append(np.asarray(tracker.update(image), float))
        if on_frame is not None:
            t = time.perf_counter()
            stop = on_frame(i, image, boxes[-1])
            outside += time.perf_counter() - t
            if stop:
                break
    if not boxes:
        raise BadInput("no frames to track")
    return np.stack(boxes), time.perf_counter() - start - outside, tracker.model_seconds


def evaluate_tracker(net, clips, device):
    """Mean success AUC over clips of the tracker and of the baseline that never moves the first box: train.py's
    evaluation. A clip: len(), frame(t) and its ground truth box(t) (x, y, w, h) (generated or --val sequences).

    The Tracker works on its own eval-mode copy of `net`, so this can run in the middle of training.
    Returns (mean AUC, mean static AUC, per-clip AUCs, per-clip static AUCs).
    """
    tracker = pntrack.Tracker(net, device=device)
    ours, static = [], []
    for clip in clips:
        gt = np.stack([clip.box(t) for t in range(len(clip))])
        boxes, _, _ = run_tracker(tracker, (clip.frame(t) for t in range(len(clip))), gt[0],
                                  name=getattr(clip, "name", None))
        ours.append(evaluate(boxes, gt)["auc"])
        static.append(evaluate(np.repeat(gt[:1], len(gt), 0), gt)["auc"])
    return float(np.mean(ours)), float(np.mean(static)), ours, static


# -----------------------------------------------------------------------------
# Command line

CURVE_LABEL, STATIC_LABEL = "PNTrack", "static first box"     # --plot: the tracker and the box that never moves


def parse_args(argv):
    """The CLI. Flags are names of what they set; no flag changes the method (that is train.py's config)."""
    p = argparse.ArgumentParser(
        prog="track.py",
        description="Track one object with PNTrack through a video, a GIF, a frame folder, a benchmark\n"
                    "sequence (frames + groundtruth.txt) or a dataset root (many sequences); score the\n"
                    "result when ground truth is there, and report the speed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python track.py             # the demo: assets/bunny.mp4, writes out/demo.txt and out/demo.gif\n"
               "  python track.py video.mp4 --box 120,80,60,90 --out boxes.txt --save tracked.mp4\n"
               "  python track.py video.mp4 --select --show   # draw the first box in a window, watch it track\n"
               "  python track.py clip.mp4    # first box from the sidecar clip.txt beside it (its first line)\n"
               "  python track.py ../shared/data/sequences/otb_Girl     # first box + scores from groundtruth.txt\n"
               "  python track.py ../shared/data/sequences --out results/ --plot curves.png\n"
               "  python track.py clip.gif --box 10,10,40,40 --config tiny --frames 50   # untrained smoke run")
    p.add_argument("input", nargs="?",
                   help="video (.mp4 .avi .mov .mkv ...), animated .gif, folder of frames, sequence "
                        "folder (frames in it or in img/ or color/, plus groundtruth.txt or "
                        "groundtruth_rect.txt), or a dataset root holding sequence folders; "
                        "none: the demo clip assets/bunny.mp4 (--out and --save default to out/demo.txt, .gif)")
    p.add_argument("--box", help="x,y,w,h of the target in the first frame, pixels, (x, y) = top-left corner; "
                                 "default for a sequence folder: its first ground-truth line; for a video or "
                                 "GIF: the first line of its sidecar NAME.txt, if there is one")
    p.add_argument("--select", action="store_true",
                   help="draw the first box in a window even where --box, ground truth or a sidecar gives one "
                        "(without any of these the window opens anyway, where there is a display): drag a "
                        "rectangle over the target, Enter or Space to track, Esc to cancel; the box is printed "
                        "as --box x,y,w,h to repeat the run without the window")
    p.add_argument("--show", action="store_true",
                   help="watch the tracking live in a window: each frame with the box (red), the ground truth "
                        "(green) when known, the frame number and the running FPS; Space pauses, q or Esc stops "
                        "and writes the boxes so far. The speed line leaves the window's time out")
    p.add_argument("--out", help="result file, one x,y,w,h line per frame (the given box first); "
                                 "for a dataset root a folder: OUT/<sequence>.txt")
    p.add_argument("--save", help="write the frames with the box drawn to FILE.mp4 (full size) or FILE.gif "
                                  f"(at most {drawing.GIF_WIDTH} px wide, {drawing.GIF_COLOURS} colours: small "
                                  f"enough for a web page)")
    p.add_argument("--plot", help="draw the success and precision plots into FILE.png, the tracker next to the "
                                  "static first box (needs ground truth)")
    p.add_argument("--ckpt", help=f"checkpoint written by train.py (default: {DEFAULT_CKPT} if it exists, "
                                  f"else the shipped weights assets/pntrack-tiny.pt)")
    p.add_argument("--config", choices=list(pntrack.PRESETS),
                   help="use an UNTRAINED network of this preset instead of a checkpoint (smoke runs, speed)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, help="CPU threads for torch (torch.set_num_threads): changes the speed, "
                                               "not the boxes (on x86 CPUs, with torch's Intel MKL); when other "
                                               "jobs share the CPU use fewer than the free cores (oversubscribed, "
                                               "it runs many times slower)")
    p.add_argument("--compile", action="store_true",
                   help="wrap the network in torch.compile: helps on a GPU only, and the first frames take "
                        "a while (compilation), so it pays off on long videos")
    p.add_argument("--frames", type=int, help="stop after this many frames (quick looks, benchmarks)")
    return p.parse_args(argv)


def load_network(args):
    """The network from --ckpt, or an untrained --config preset; BadInput names a missing or bad checkpoint."""
    if args.config:
        if args.ckpt:
            raise BadInput("--ckpt and --config: give one (--config means an untrained network)")
        warn(f"--config {args.config}: the network is UNTRAINED (random weights); boxes are meaningless")
        return pntrack.PNTrack(pntrack.make_config(args.config))
    # your own training run wins; otherwise the weights shipped with the repo (README: how they were made)
    path = args.ckpt or (DEFAULT_CKPT if os.path.isfile(DEFAULT_CKPT) else SHIPPED_CKPT)
    how = (f"train one with `python train.py` (writes {DEFAULT_CKPT} in ~10 min on a CPU), "
           f"or pass --ckpt PATH")
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such checkpoint; {how}")
    try:
        net = pntrack.load_checkpoint(path)
    except ValueError as e:                            # its message names the file: not a checkpoint
        raise BadInput(f"{e}; {how}" if path == SHIPPED_CKPT else str(e)) from None
    print(f"checkpoint: {path}" + (" (the shipped weights)" if path == SHIPPED_CKPT else ""))
    return net


def open_sequence(path, box_text, limit, select=False):
    """One input -> dict(name, frames (generator of images), n (frames, or None if unknown), gt, box, fps).

    gt: (N, 4) ground truth or None; box: the first box (--box, else the first ground-truth line of a sequence
    folder, else the first line of a video's or GIF's sidecar `<name>.txt`, else drawn by the user in a window,
    `pick_box`, where there is a display). select (--select): drawn by the user even where a box is given.
    """
    name = os.path.basename(os.path.abspath(path))
    gt, box, box_from = None, None, None
    # the box's numbers are checked before any file is opened; whether it fits the image, at the first frame
    if box_text:
        box_from = f"--box {box_text}"
        try:
            box = media.parse_box(box_text, box_from)
        except ValueError as e:
            raise BadInput(str(e)) from None
    elif not os.path.isdir(path):                      # a video or GIF: the sidecar beside it, if there is one
        box, box_from = media.sidecar_box(path)
    if os.path.isdir(path):
        files = media.list_frames(path)
        gt_file = media.find_box_file(path)
        if gt_file:
            # read and checked before any tracking, so a bad file fails at once, not after a long run
            try:
                gt = media.read_boxes(gt_file)
            except ValueError as e:                    # names file:line and what is wrong with it
                raise BadInput(str(e)) from None
            # one line is a first box only (GOT-10k's test split): nothing to score against
            if len(gt) != len(files) and len(gt) > 1:
                fewer = "fewer" if len(gt) < len(files) else "more"
                raise BadInput(f"{gt_file}: {len(gt)} boxes for {len(files)} frames ({fewer} boxes than frames)")
        files = files[:limit]
        frames, n, fps = media.image_frames(files), len(files), 30
    elif path.lower().endswith(".gif"):
        gif = None
        try:
            gif = Image.open(path)
            n = getattr(gif, "n_frames", 1)            # counting the frames reads the whole file
        except media.PIL_ERRORS as e:
            if gif is not None:
                gif.close()
            raise BadInput(f"{path}: cannot open as a GIF ({e})") from None
        name = os.path.splitext(name)[0]
        ms = max(gif.info.get("duration") or 100, 10)  # ms per frame
        # (browsers also treat GIF delays under 10 ms as 100 ms; we only keep the rate sane for --save)
        frames, fps = media.gif_frames(gif, path), 1000 / ms
    elif path.lower().endswith(media.IMAGE_EXT):
        raise BadInput(f"{path}: a single image; give a video, a GIF or a folder of frames")
    else:                                              # anything else: whatever FFmpeg can read
        container, stream = media.open_video(path)
        name = os.path.splitext(name)[0]
        frames = media.video_frames(container, stream, path)
        n, fps = stream.frames or None, stream.average_rate or 30
    if limit and n:
        n = min(n, limit)
    if not box_text and gt is not None:                # a sequence folder: its first ground-truth line
        box, box_from = gt[0], f"{os.path.basename(gt_file)}, first line"     # errors name the folder too
        try:
            pntrack.check_box(box)
        except ValueError as e:
            raise BadInput(f"{gt_file}, first line: {e}") from None
    if select or box is None:                          # --select, or no box came with the input: the user draws it
        first = next(frames, None)                     # shown in the picker, then tracked from
        if first is None:
            raise BadInput(f"{path}: no frames to track")
        frames = itertools.chain([first], frames)
        box_text = "%d,%d,%d,%d" % window.pick_box(first, path)
        print(f"box: --box {box_text}  (drawn; give it to repeat this run without the window)")
        box_from = f"--box {box_text}"
        box = media.parse_box(box_text, box_from)      # the check a typed --box gets
    if gt is not None:
        gt = gt[:limit] if len(gt) > 1 else None
    return dict(name=name, frames=itertools.islice(frames, limit), n=n, gt=gt, box=box, fps=fps,
                box_from=box_from)


def track_sequence(tracker, seq, path, save=None, viewer=None):
    """Run the tracker over one opened sequence, with progress on stderr, frames saved and shown if asked.

    viewer: a Viewer (--show), closed here; the user can stop the run there (q), its boxes so far returned.
    Returns (boxes (N, 4), seconds in total, seconds in the network, frames the network saw).
    """
    saver = drawing.Saver(save, seq["fps"]) if save else None
    start, seen = time.perf_counter(), 0               # seen: frames given to the network (not the first)

    def on_frame(i, image, box):
        nonlocal seen
        seen += i > 0 and image is not None
        if image is not None and (saver or viewer):
            drawing.draw_boxes(image, box, seq["gt"][i] if seq["gt"] is not None else None)
        if saver:
            saver.add(image)
        if (i + 1) % PROGRESS_EVERY == 0:
            of = f"/{seq['n']}" if seq["n"] else ""
            print(f"  {seq['name']}: frame {i + 1}{of}, {(i + 1) / (time.perf_counter() - start):.1f} FPS",
                  file=sys.stderr)
        return viewer is not None and viewer.show(i, image)      # True: stop here

    try:
        boxes, total, model = run_tracker(tracker, seq["frames"], seq["box"], on_frame, path, seq.get("box_from"))
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None
    finally:
        if saver:
            saver.close()
        if viewer:
            viewer.close()
    return boxes, total, model, seen


def speed_line(frames, total, model, seen, tracker):
    """`speed: 123.4 FPS model, 80.1 FPS end to end (cpu, 2 threads, tiny, 140 frames)`.

    Model FPS counts the frames the network saw (not the first, which only makes the template).
    """
    dev = tracker.device
    n = torch.get_num_threads()
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {n} thread{'s' * (n > 1)}"
    fps_model = f"{seen / model:.1f}" if model > 0 else "n/a"
    why = [f"peak score < {tracker.cfg.hold_below_score:g}"] * (tracker.cfg.hold_below_score > 0) \
        + ["or the old box more like the first template"] * tracker.cfg.verify_move
    held = f"; box held on {tracker.held} of {seen} frames ({' '.join(why)})" if why else ""
    return (f"speed: {fps_model} FPS model, {frames / total:.1f} FPS end to end "
            f"({where}, {tracker.cfg.name}, {frames} frames){held}")


def check_args(args):
    """Argument checks argparse cannot express; BadInput names the argument."""
    if args.frames is not None and args.frames < 1:
        raise BadInput(f"--frames {args.frames}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise BadInput(f"--threads {args.threads}: must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA GPU is available here (use --device cpu)")
    if args.save and not args.save.lower().endswith((".mp4", ".gif")):
        raise BadInput(f"--save {args.save}: give a file name ending in .mp4 or .gif")
    if args.plot and os.path.splitext(args.plot)[1].lower() not in Image.registered_extensions():
        raise BadInput(f"--plot {args.plot}: give an image file name such as curves.png")
    if not os.path.exists(args.input):
        raise BadInput(f"{args.input}: no such file or folder")
    # a folder is a sequence if it holds frames (itself, img/ or color/), else a dataset root if it holds sequences
    if os.path.isdir(args.input) and not media.list_frames(args.input) and not media.list_sequences(args.input):
        raise BadInput(f"{args.input}: no images in this folder (nor in img/ or color/), "
                       f"and no sequence folders (frames + groundtruth.txt) below it")


def make_tracker(args):
    """Device, threads, network and Tracker, chosen once here; prints the parameter count as a sanity number."""
    device = pntrack.pick_device(args.device)
    if args.threads:                                   # torch's default: one per core
        torch.set_num_threads(args.threads)
    tracker = pntrack.Tracker(load_network(args), device=device)
    n_params = sum(p.numel() for p in tracker.net.parameters())
    print(f"network: {tracker.cfg.name}, {n_params / 1e6:.1f}M parameters, on {device}")
    if args.compile:                                   # compiled at the first update: shapes never change after
        tracker.net = torch.compile(tracker.net)
    return tracker


def track_one(args):
    """A video, GIF, frame folder or sequence folder: track, write, score, report the speed."""
    if args.out and os.path.isdir(args.out):
        raise BadInput(f"--out {args.out}: is a folder; give a file name (a folder is for dataset roots)")
    seq = open_sequence(args.input, args.box, args.frames, args.select)
    if args.plot and seq["gt"] is None:
        raise BadInput(f"--plot: {args.input} has no ground truth to plot against")
    viewer = window.Viewer(seq["name"], seq["n"]) if args.show else None  # no display: one line, before the network
    tracker = make_tracker(args)
    boxes, total, model, seen = track_sequence(tracker, seq, args.input, args.save, viewer)
    if viewer and viewer.stopped:
        print(f"stopped at frame {len(boxes)} (q or Esc in the window); the results hold the frames tracked so far")
    if args.out:
        media.write_boxes(args.out, boxes)
        print(f"wrote {args.out} ({len(boxes)} boxes)")
    if args.save:
        print(f"wrote {args.save} ({len(boxes)} frames)")
    if seq["gt"] is not None:
        scores = evaluate(np.round(boxes, 2), seq["gt"][:len(boxes)])    # rounded: the scores of the file
        print(f"{seq['name']}: {format_scores(scores)}")
        if args.plot:                                  # next to the baseline that never moves the first box
            static = evaluate(np.repeat(boxes[:1], len(boxes), 0), seq["gt"][:len(boxes)])
            drawing.plot_curves(args.plot, [(CURVE_LABEL, scores["success_curve"], scores["precision_curve"]),
                                            (STATIC_LABEL, static["success_curve"], static["precision_curve"])])
            print(f"wrote {args.plot}")
    print(speed_line(len(boxes), total, model, seen, tracker))


def track_dataset(args):
    """Every sequence folder below a dataset root, each from its own first box: a score table and the mean."""
    if args.box:
        raise BadInput(f"--box: not used for a dataset root ({args.input}); each sequence starts from "
                       f"its own first ground-truth box")
    for flag in ("save", "show", "select"):
        if getattr(args, flag):
            raise BadInput(f"--{flag}: not supported for a dataset root ({args.input}); run on one sequence folder")
    if args.out and os.path.isfile(args.out):
        raise BadInput(f"--out {args.out}: is a file; a dataset root needs a folder (OUT/<sequence>.txt)")
    folders = media.list_sequences(args.input)
    # every GT file is read and checked before the first sequence is tracked; frames are read lazily
    seqs = [open_sequence(f, None, args.frames) for f in folders]
    tracker = make_tracker(args)
    width = max([len(s["name"]) for s in seqs] + [20])
    print(f"{'sequence':<{width}} {'frames':>6} " + " ".join(f"{n:>7}" for n in SCORE_NAMES) + f" {'FPS':>7}")
    # one row per sequence as it finishes (the table is also the progress report), then the mean;
    # frames and seconds are summed over the sequences for the speed line
    rows, n_frames, n_seen, total, model = [], 0, 0, 0.0, 0.0
    for folder, seq in zip(folders, seqs):
        boxes, t, m, seen = track_sequence(tracker, seq, folder)
        n_frames, n_seen, total, model = n_frames + len(boxes), n_seen + seen, total + t, model + m
        if args.out:
            media.write_boxes(os.path.join(args.out, seq["name"] + ".txt"), boxes)
        if seq["gt"] is None:                          # a first box only: tracked, not scored
            print(f"{seq['name']:<{width}} {len(boxes):>6}  (no ground truth beyond the first box)")
            continue
        s = evaluate(np.round(boxes, 2), seq["gt"][:len(boxes)])
        s["static"] = evaluate(np.repeat(boxes[:1], len(boxes), 0), seq["gt"][:len(boxes)])   # for --plot
        rows.append(s)
        print(f"{seq['name']:<{width}} {len(boxes):>6} " + " ".join(f"{100 * s[k]:7.1f}" for k in SCORES)
              + f" {len(boxes) / t:7.1f}", flush=True)
    if rows:                                           # the mean of per-sequence scores, as the benchmarks do
        mean = {k: np.mean([r[k] for r in rows], 0) for k in SCORES + ("success_curve", "precision_curve")}
        print(f"{f'mean ({len(rows)} sequences)':<{width}} {n_frames:>6} "
              + " ".join(f"{100 * mean[k]:7.1f}" for k in SCORES) + f" {n_frames / total:7.1f}")
        if args.plot:
            static = {k: np.mean([r["static"][k] for r in rows], 0) for k in ("success_curve", "precision_curve")}
            drawing.plot_curves(args.plot, [(CURVE_LABEL, mean["success_curve"], mean["precision_curve"]),
                                            (STATIC_LABEL, static["success_curve"], static["precision_curve"])])
            print(f"wrote {args.plot}")
    elif args.plot:
        warn(f"--plot {args.plot}: no sequence has ground truth beyond its first box; nothing to plot")
    if args.out:
        print(f"wrote {len(seqs)} result files to {args.out}")
    print(speed_line(n_frames, total, model, n_seen, tracker))


def main(argv=None):
    """Command-line entry point; returns the exit code: 0 done, 2 bad input (one line on stderr)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:                            # --help (0) or an argparse usage error (2)
        return e.code
    demo = args.input is None                          # `python track.py`: the clip shipped in assets/
    if demo:
        args.input = DEMO_CLIP
        args.out, args.save = args.out or DEMO_OUT + ".txt", args.save or DEMO_OUT + ".gif"
    try:
        check_args(args)
        if os.path.isdir(args.input) and not media.list_frames(args.input):
            track_dataset(args)
        else:
            track_one(args)
        if demo:
            print(f"demo: tracked {DEMO_CLIP} (Big Buck Bunny, Blender Foundation, CC BY 3.0) into {args.out} "
                  f"and {args.save}; your own video: python track.py your_video.mp4 --box x,y,w,h")
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                               # a file we could not read or write
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
