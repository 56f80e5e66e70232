"""extras/media.py: reading what the user gives the scripts: frame folders, image files, videos (PyAV), GIFs and
box files (ground truth, a sidecar `<name>.txt` beside a video, results).

track.py streams its input through the readers below, one frame at a time; train.py builds its training
sequences from the same pieces (list_frames, find_box_file, read_first_box, load_image) and decodes its videos
with the same `decode_video`, and reads its --val sequences as `LabelledSequence`s. Boxes in files are
(x, y, w, h), top-left corner, pixels: the benchmarks' format. A problem with the user's input is one line:
BadInput for track.py (exit code 2), ValueError naming the file.
"""
import functools
import os
import re
import sys

import av
import numpy as np
from PIL import Image

import pntrack

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXT = (".mp4", ".avi", ".mov", ".mkv", ".webm")
GT_FILES = ("groundtruth.txt", "groundtruth_rect.txt")                # ground truth: track.py, train.py --val
BOX_FILES = ("groundtruth.txt", "groundtruth_rect.txt", "init.txt")   # GOT-10k/LaSOT/VOT, OTB, ours: training


class BadInput(ValueError):
    """A problem with what the user gave (a file, an argument): track.py's main prints its one line and exits with 2."""


def warn(message):
    """A problem the run survives (a skipped sequence, a broken later frame): one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def make_parent(path):
    """Create the folder `path` will be written into; returns that folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return folder


# -----------------------------------------------------------------------------
# Box files and frame folders

def parse_box(text, where, check=True):
    """One line of a box file -> (x, y, w, h) float array.

    Comma, tab or space separated (OTB uses all three); 4 numbers (x, y, w, h) or 8 (a VOT polygon,
    replaced by its axis-aligned bounding box). `where` ("file.txt:3") names the line in errors.
    check: the box must be finite with w, h > 0 (`pntrack.check_box`); off for ground-truth lines, where
    NaN means "target absent" (LaSOT) and such frames are simply not scored.
    """
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = np.array([float(p) for p in parts])
    except ValueError:
        raise ValueError(f"{where}: expected numbers, found {text.strip()[:60]!r}") from None
    if len(values) == 8:                     # numpy's min / max: a NaN corner gives a NaN box
        xs, ys = values[0::2], values[1::2]
        with np.errstate(invalid="ignore", over="ignore"):        # inf - inf is NaN: checked below
            values = np.array([xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()])
    if len(values) != 4:
        raise ValueError(f"{where}: expected 4 numbers (x,y,w,h) or 8 (polygon), found {len(values)}")
    if check:
        try:
            pntrack.check_box(values)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return values


def read_first_box(path):
    """The only function that reads a label for training: the first non-empty line of a box file -> (cx, cy, w, h).

    Later lines are never read (training uses the first-frame box only, Init.BBox supervision).
    """
    try:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():      # parse_box checks the numbers: finite, w and h > 0
                    return pntrack.xywh_to_cxcywh(parse_box(line, f"{path}:{i}"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file of boxes (it holds bytes that are not text)") from None
    raise ValueError(f"{path}: no box in the file")


def read_boxes(path):
    """All boxes of a ground-truth file -> (N, 4) (x, y, w, h); non-finite entries (LaSOT's 'nan', absent
    target) are kept: `evaluate` does not score those frames."""
    try:
        with open(path) as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file of boxes (it holds bytes that are not text)") from None
    if not lines:
        raise ValueError(f"{path}: empty box file")
    return np.stack([parse_box(line, f"{path}:{i}", check=False) for i, line in lines])


def write_boxes(path, boxes):
    """(N, 4) (x, y, w, h) -> one `x,y,w,h` line per frame (%.2f), the OTB / GOT-10k / LaSOT result format.

    Written to a temporary file, then renamed: a run killed mid-write never leaves a half file behind.
    """
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines("%.2f,%.2f,%.2f,%.2f\n" % tuple(b) for b in boxes)
    pntrack.atomic_write(path, write)


def list_frames(folder):
    """Sorted image files of a sequence: directly in `folder`, else in its img/ or color/ subfolder."""
    for sub in ("", "img", "color"):
        d = os.path.join(folder, sub)
        if os.path.isdir(d):
            frames = sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith(IMAGE_EXT))
            if frames:
                return frames
    return []


def find_box_file(folder, names=GT_FILES):
    """The first of `names` present in `folder`, or None."""
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def sidecar_box(path):
    """The first box of a video or GIF from its sidecar `<name>.txt` (`clip.txt` beside `clip.mp4`, the layout
    train.py reads): (box, where) from its first non-empty line, checked as --box is; (None, None) if absent."""
    sidecar = os.path.splitext(path)[0] + ".txt"
    if sidecar == path or not os.path.isfile(sidecar):
        return None, None
    try:
        with open(sidecar) as f:
            first = next(((i, line) for i, line in enumerate(f, 1) if line.strip()), None)
        if first is None:
            raise ValueError(f"{sidecar}: empty box file")
        where = f"{sidecar}:{first[0]}"
        return parse_box(first[1], where), where
    except UnicodeDecodeError:                         # a ValueError too: caught first
        raise BadInput(f"{sidecar}: not a text file of boxes (it holds bytes that are not text)") from None
    except ValueError as e:                            # names sidecar:line and the rule broken
        raise BadInput(str(e)) from None


def list_sequences(root):
    """Sequence folders (frames + a ground-truth file) directly below `root`, sorted by name."""
    subs = [os.path.join(root, d) for d in sorted(os.listdir(root))]
    return [d for d in subs if os.path.isdir(d) and find_box_file(d) and list_frames(d)]


# -----------------------------------------------------------------------------
# Reading frames. Each of track.py's readers is a generator of RGB PIL images, one per frame, decoded only when
# asked for. A frame that fails to decode comes out as None (with a warning): the tracker repeats its last box there.

# what Pillow raises for broken files (IndexError: a truncated GIF; a bomb: a header claiming a huge size)
PIL_ERRORS = (OSError, SyntaxError, ValueError, IndexError, EOFError, Image.DecompressionBombError)


def read_image(path):
    """An image file -> RGB PIL image; a broken file raises ValueError naming it (both scripts read images so)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except PIL_ERRORS as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None


@functools.lru_cache(maxsize=64)
def load_image(path):
    """Decode an image file to RGB (train.py's sequences). Cached: every sample of a sequence reuses its first frame
    (template and views), so with few sequences most decodes are hits. Callers never modify the returned image."""
    return read_image(path)


def image_frames(files):
    """Image files, in order. An unreadable first frame is bad input (there is no box to repeat yet)."""
    for i, path in enumerate(files):
        try:
            image = read_image(path)
        except ValueError as e:
            if i == 0:
                raise BadInput(str(e)) from None
            warn(f"{e}; repeating the last box")
            image = None
        yield image


def open_video(path):
    """PyAV container and its first video stream; BadInput if FFmpeg cannot read the file."""
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise BadInput(f"{path}: cannot open as a video ({e.strerror or e})") from None
    if not container.streams.video:
        container.close()
        raise BadInput(f"{path}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"                        # let FFmpeg decode with several threads
    return container, stream


def decode_video(container, stream):
    """The one video decoder of both scripts: packet by packet, so a broken packet costs one frame, not the rest of
    the video. Yields each frame as an RGB PIL image, or, in place of a packet that fails to decode, the
    av.FFmpegError it raised; an error of the container itself (demuxing) is raised. The caller decides what a
    broken frame means: track.py repeats the last box there (`video_frames`), train.py keeps the frames before it.
    """
    for packet in container.demux(stream):             # ends with an empty packet that flushes the decoder
        try:
            images = [frame.to_image() for frame in packet.decode()]
        except av.FFmpegError as e:
            images = [e]
        yield from images


def video_frames(container, stream, path):
    """track.py's video reader: `decode_video`, with a frame that fails to decode as None (and a warning)."""
    n = 0
    with container:
        try:
            for image in decode_video(container, stream):
                if isinstance(image, av.FFmpegError):
                    e = image
                    if n == 0:                         # no first frame, no box to repeat: bad input
                        raise BadInput(f"{path}: the first frame cannot be decoded ({e.strerror or e})") from None
                    warn(f"{path}: frame {n + 1} failed to decode ({e.strerror or e}); repeating the last box")
                    image = None
                n += 1
                yield image
        except av.FFmpegError as e:                    # the container itself is broken from here on
            if n == 0:
                raise BadInput(f"{path}: no frame can be read ({e.strerror or e})") from None
            warn(f"{path}: unreadable after frame {n} ({e.strerror or e}); stopping there")


def video_frame_count(path):
    """The number of frames a video's header gives (0: unknown); ValueError if PyAV cannot open it (train.py)."""
    try:
        with av.open(path) as c:
            return c.streams.video[0].frames
    except Exception as e:
        raise ValueError(f"{path}: PyAV cannot open the video ({type(e).__name__}: {str(e)[:80]})") from None


def first_video_frames(path, n, size):
    """train.py's video reader: the first n frames of a video, decoded at once with `decode_video`, frame 0 at full
    size and the rest shrunk to fit size x size. A frame that fails to decode ends the video there (a warning);
    ValueError if not even the first one decodes."""
    frames = []
    try:
        with av.open(path) as c:
            for i, im in enumerate(decode_video(c, c.streams.video[0])):
                if isinstance(im, av.FFmpegError):
                    raise im
                if i > 0:
                    im.thumbnail((size, size))
                frames.append(im)
                if len(frames) >= n:
                    break
    except av.FFmpegError as e:        # a broken file: the frames before the break are kept
        warn(f"{path}: decoding stopped after frame {len(frames)} ({e.strerror or e})")
    if not frames:
        raise ValueError(f"{path}: no frame could be decoded")
    return frames


def gif_frames(gif, path):
    """Frames of an animated GIF, decoded one at a time with Pillow's seek."""
    with gif:
        for i in range(getattr(gif, "n_frames", 1)):   # a still image has no n_frames: one frame
            try:
                gif.seek(i)
                image = gif.convert("RGB")
            except PIL_ERRORS as e:
                if i == 0:                             # no first frame, no box to repeat: bad input
                    raise BadInput(f"{path}: the first frame cannot be decoded ({e})") from None
                warn(f"{path}: frame {i + 1} failed to decode ({e}); repeating the last box")
                image = None
            yield image


# -----------------------------------------------------------------------------
# Labelled sequences: what train.py evaluates on with --val (all the ground truth, unlike its training data)

class LabelledSequence:
    """A --val sequence for evaluation (all its ground truth is read, unlike training data)."""
    def __init__(self, folder, box_file):
        self.name, self.frames, self.gt = os.path.basename(folder), list_frames(folder), read_boxes(box_file)
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
            warn(f"{e}; repeating the last box")
            return None

    def box(self, t):
        return self.gt[t]


def find_val_sequences(root):
    """train.py --val ROOT: every sequence folder (frames + ground truth) below ROOT -> [LabelledSequence]; a bad
    one is skipped with a warning, none at all is a ValueError."""
    out = []
    for folder, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        box_file = find_box_file(folder)
        if box_file and list_frames(folder):
            try:
                out.append(LabelledSequence(folder, box_file))
            except (ValueError, OSError) as e:       # one bad sequence is skipped, not the end of the run
                warn(f"--val: skipping {e}")
    if not out:
        raise ValueError(f"--val {root}: no sequence folders (frames + groundtruth.txt) found")
    return out
