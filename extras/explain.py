"""extras/explain.py: the figures of `python train.py --explain DIR`. One prompt-mode and one noise-mode cycle
run on a small batch with `SelfSupervised.record` switched on (`record_steps`), and this module draws the tensors
the code computed in that step (nothing is re-derived for the pictures): cycle.png, prompt.png, noise.png; then
curves.png from a train.log, and tracking.gif: the inference Tracker on a held-out generated clip. Pillow only
(no matplotlib). train.py's `explain` puts it together, with a batch from its own data pipeline.
"""
import math
import os
import re
from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageDraw

import pntrack
from extras import drawing

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
        # the first frame letterboxed to Sx x Sx, the scale full frame -> letterbox, its box (cx, cy, w, h) px
        f0, s, box = first[b]
        f0 = draw_box(f0.copy(), torch.as_tensor(box) * s / cfg.search_size, GREEN)
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
        drawing.draw_plot(draw, rect, [(None, d["x"], d[name])], (0, x1), (0, y1), title, "epoch")
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


def tracking_gif(path, clip, boxes, gt, size=160, n_frames=40):
    """A tracked generated clip as a GIF: n_frames spread over the clip, `size` px wide, with the ground truth `gt`
    (green) and the tracker's `boxes` (red), both (N, 4) (x, y, w, h). train.py picks the clip: the held-out one
    with the median AUC among those `python train.py` evaluates on."""
    frames, s = [], size / clip.W
    for t in np.linspace(0, len(clip) - 1, min(n_frames, len(clip))).round().astype(int):
        im = clip.frame(t).resize((size, round(clip.H * s)), Image.BILINEAR)
        drawing.draw_boxes(im, boxes[t] * s, gt[t] * s)
        frames.append(im)
    # one 64-colour palette for all frames (a third of the bytes of a palette per frame), box colours included
    source = Image.new("RGB", (size * (len(frames[::8]) + 1), frames[0].height), GREEN)
    for i, im in enumerate(frames[::8]):
        source.paste(im, (size * i, 0))
    source.paste(Image.new("RGB", (size // 2, frames[0].height), (255, 40, 40)), (size * len(frames[::8]), 0))
    palette = source.quantize(64, dither=Image.Dither.NONE)
    frames = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=150, loop=0, optimize=True)


def repo_path(path):
    """A file's name for figure titles: relative to the repository when it lies inside it (the same on every
    machine), else as given."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # extras/ is one level down
    rel = os.path.relpath(os.path.abspath(path), repo)
    return path if rel.startswith("..") else rel




# -----------------------------------------------------------------------------
# The step the figures show. train.py's `explain` puts these together with a batch of its data pipeline.

def load_model(ckpt, cfg, seed):
    """The network whose training step the figures show -> (SelfSupervised, its weights in words for the titles).

    ckpt: a pntrack.pt (the DCA weights come from a last.pt beside it, if there is one); None: an untrained
    network of `cfg` (default: tiny). seed: the torch seed of the weight init and of the step's random draws.
    """
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
    return model, weights


def record_steps(model, batch, originals, device):
    """One prompt-mode and one noise-mode step of `model` on a batch as the loader makes it, with
    `SelfSupervised.record` on -> {mode: {"steps": [each step's recorded tensors], "terms": the loss terms}} (CPU).
    """
    model.to(device).train()                   # train mode, as in a training step (BatchNorm batch statistics)
    records = {}
    with torch.no_grad():
        for mode in ("prompt", "noise"):
            model.record = {}
            _, terms = model(*[t.to(device) for t in batch], mode=mode, originals=originals)
            records[mode] = {"steps": [{k: v.cpu() for k, v in st.items()} for st in model.record["steps"]],
                             "terms": terms.cpu()}
    model.record = None
    return records


def write_figures(out_dir, records, batch, first, cfg, weights, log):
    """cycle.png, prompt.png, noise.png of the recorded steps and, from `log` (a train.log; None: skipped),
    curves.png into out_dir -> their file names. first: per sample (first frame letterboxed to Sx x Sx, the scale
    full frame -> letterbox, the first box (cx, cy, w, h) px)."""
    batch_size, name = len(batch[0]), f"weights: {weights}"
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
    return list(figures)
