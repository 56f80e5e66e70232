"""extras/drawing.py: pictures of a tracking run, drawn with Pillow (no matplotlib): the boxes on a frame, the
frames written to .mp4 or .gif (`track.py --save`, the `Saver`), and the OTB success and precision plots
(`track.py --plot`, `plot_curves`; `draw_plot` also draws the training curves of `train.py --explain`).
"""
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageDraw

from extras import media


BOX_RED, GT_GREEN = (255, 40, 40), (0, 220, 0)         # the tracker's box, the ground truth
GIF_WIDTH, GIF_COLOURS = 256, 64       # --save FILE.gif: frames scaled down to this width, one palette of this size


def draw_boxes(image, box, gt=None):
    """Draw the prediction (red) and, where known, the ground truth (green) on `image`, in place."""
    draw = ImageDraw.Draw(image)
    width = max(2, image.width // 200)                 # lines stay visible on large frames
    if gt is not None and np.isfinite(gt).all() and gt[2] > 0 and gt[3] > 0:     # as scored: no empty boxes
        x, y, w, h = gt
        draw.rectangle([x, y, x + w, y + h], outline=GT_GREEN, width=max(1, width // 2))
    x, y, w, h = box
    draw.rectangle([x, y, x + w, y + h], outline=BOX_RED, width=width)


class Saver:
    """Writes frames to .mp4 (PyAV, H.264, streamed to disk) or .gif (Pillow, held in memory until `close`;
    at most GIF_WIDTH px wide and GIF_COLOURS colours, so the demo's GIF stays under 1 MB for the README).

    Every frame gets one picture: a frame that failed to decode repeats the previous picture. Note that
    Pillow merges identical consecutive frames of a GIF into one longer frame.
    """
    def __init__(self, path, fps):
        self.path, self.fps = path, fps
        self.gif = path.lower().endswith(".gif")
        media.make_parent(path)
        self.frames, self.last, self.container = [], None, None

    def add(self, image):
        if image is None:
            image = self.last
        elif self.gif and image.width > GIF_WIDTH:     # GIF frames wait in memory until close: scaled down now
            image = image.resize((GIF_WIDTH, max(1, round(image.height * GIF_WIDTH / image.width))), Image.BILINEAR)
        self.last = image
        if self.gif:
            self.frames.append(image)
            return
        if self.container is None:                     # size is known at the first frame
            self.container = av.open(self.path, "w")
            self.stream = self.container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            # H.264 with 4:2:0 colour needs even width and height: pad by one black pixel where odd
            self.stream.width, self.stream.height = image.width + image.width % 2, image.height + image.height % 2
            self.stream.pix_fmt = "yuv420p"
        canvas = Image.new("RGB", (self.stream.width, self.stream.height))
        canvas.paste(image)                            # also fits frames of a different size (cropped / padded)
        self.container.mux(self.stream.encode(av.VideoFrame.from_image(canvas)))

    def close(self):
        if self.gif and self.frames:
            # one palette for every frame, from ~8 frames spread over the video plus the box colours, and no
            # dithering: background that does not change stays the same pixels, which a GIF stores cheaply
            sample = self.frames[::max(1, len(self.frames) // 8)]
            w, h = self.frames[0].size
            source = Image.new("RGB", (w, h * len(sample)))
            for i, im in enumerate(sample):
                source.paste(im, (0, h * i))
            palette = source.quantize(GIF_COLOURS - 2, dither=Image.Dither.NONE)
            palette.putpalette(palette.getpalette()[:3 * (GIF_COLOURS - 2)] + [*BOX_RED, *GT_GREEN])
            frames = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in self.frames]
            frames[0].save(self.path, save_all=True, append_images=frames[1:],
                           duration=round(1000 / self.fps), loop=0, optimize=True)
        if self.container is not None:
            self.container.mux(self.stream.encode(None))   # flush the frames the encoder still holds
            self.container.close()


PLOT_COLOURS = ((220, 30, 30), (40, 90, 220), (130, 130, 130), (30, 150, 60), (150, 60, 170), (230, 140, 20),
                (0, 160, 170))                 # curve colours in order: the first (ours) is red


def draw_plot(draw, rect, curves, x_range, y_range, title, x_label, legend="bottom left"):
    """One line plot drawn with Pillow (no matplotlib): a frame, 6 labelled ticks per axis, a polyline per curve.

    rect: (left, top, right, bottom) of the plot area in image px; curves: [(label, xs, ys)], coloured in
    PLOT_COLOURS order; a label None gets no legend entry. legend: "bottom left" | "bottom right" | "top right".
    """
    left, top, right, bottom = rect
    (x0, x1), (y0, y1) = x_range, y_range

    def at(x, y):                                  # data (x, y) -> image px
        return left + (right - left) * (x - x0) / (x1 - x0), bottom - (bottom - top) * (y - y0) / (y1 - y0)

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(6):                             # 6 ticks per axis, labelled
        (tx, _), (_, ty) = at(x0 + (x1 - x0) * i / 5, y0), at(x0, y0 + (y1 - y0) * i / 5)
        draw.line([tx, bottom, tx, bottom + 4], fill="black")
        draw.text((tx, bottom + 6), f"{x0 + (x1 - x0) * i / 5:.3g}", fill="black", anchor="ma")
        draw.line([left - 4, ty, left, ty], fill="black")
        draw.text((left - 6, ty), f"{y0 + (y1 - y0) * i / 5:.3g}", fill="black", anchor="rm")
    draw.text(((left + right) / 2, top - 22), title, fill="black", anchor="ma")
    draw.text(((left + right) / 2, bottom + 30), x_label, fill="black", anchor="ma")
    labelled = [(label, c) for (label, _, _), c in zip(curves, PLOT_COLOURS) if label is not None]
    width = max([draw.textlength(label) for label, _ in labelled] + [0])
    lx = left + 10 if legend == "bottom left" else right - 44 - width
    for (label, xs, ys), colour in zip(curves, PLOT_COLOURS):
        draw.line([at(x, y) for x, y in zip(xs, ys)], fill=colour, width=2)
    for i, (label, colour) in enumerate(labelled):  # stacked away from the legend's corner
        ly = top + 14 + 16 * i if legend == "top right" else bottom - 18 - 16 * (len(labelled) - 1 - i)
        draw.line([lx, ly, lx + 24, ly], fill=colour, width=2)
        draw.text((lx + 30, ly), label, fill="black", anchor="lm")


def plot_curves(path, curves):
    """OTB success and precision plots side by side in one image, drawn with Pillow (no matplotlib).

    curves: [(label, success, precision)], e.g. the tracker and the static first box; success: (21,) share of
    frames with IoU > t, t = 0, 0.05, ..., 1 (AUC = its mean); precision: (51,) share of frames with centre
    error <= t px, t = 0, ..., 50 (the score is t = 20).
    """
    W, H, m = 440, 360, 52                             # one panel's size and its left/bottom margin, px
    image = Image.new("RGB", (2 * W, H), "white")
    draw = ImageDraw.Draw(image)
    # x: the thresholds of the curves (track.py's IOU_THRESHOLDS and PIXEL_THRESHOLDS)
    success = [(f"{label} [AUC {100 * s.mean():.1f}]", np.linspace(0, 1, len(s)), s) for label, s, _ in curves]
    precision = [(f"{label} [20 px {100 * p[20]:.1f}]", np.arange(len(p)), p) for label, _, p in curves]
    # legends in the corner the curves leave free: bottom left for success, bottom right for precision
    draw_plot(draw, (m, 30, W - 16, H - m), success, (0, 1), (0, 1), "Success plot", "overlap threshold")
    draw_plot(draw, (W + m, 30, 2 * W - 16, H - m), precision, (0, 50), (0, 1), "Precision plot",
              "location error threshold (px)", legend="bottom right")
    media.make_parent(path)
    image.save(path)

