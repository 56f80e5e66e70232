"""Fuzz: every parser and reader fed random and adversarial input (docs/BAD_INPUT.md; `pytest -q -k fuzz -s` prints
the counts).
"""
import io
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import extras.media
import pntrack
import track
import train
from conftest import FAST_CFG, fake_mae_checkpoint, make_clip, read_result, short_run, texture, tiny, write_clip

# Seeded and tiny (48x36 frames, 4 of them, one untrained network per test), so all cases run in seconds.
# The documented outcome: exit 0 with one finite x,y,w,h line per frame, the given box first and every later
# box inside its frame; or exit 2 with exactly one `error:` line naming the input. Never a traceback, a
# Python warning or an `np.float64(...)` repr; in training, a bad sequence is skipped and the run goes on.

FUZZ_W, FUZZ_H, FUZZ_N, FUZZ_BOX = 48, 36, 4, "10,8,16,12"
FUZZ_CFG = FAST_CFG          # the tracker's crops, clipping and readers are fuzzed, not the network
FUZZ_CASES = dict(box=100, groundtruth=100, frames=40, video=30, gif=30, checkpoint=30, pretrained=20)
FUZZ_FIELDS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e30", "-1e30", "1e308", "1e400", "0", "-0",
               "-5", "1e-300", "5e-324", "abc", "0x10", "1_0", "--1", "12.5", "47.99", "48", "36", "", "\u0663"]
FUZZ_SEPS = [",", " ", "\t", ", ", " ,\t", ";", ",,"]


def fuzz_frames():
    return make_clip(FUZZ_N, (FUZZ_W, FUZZ_H), side=12, start=(10, 8), step=(2, 1))[0]     # an object under FUZZ_BOX


def fuzz_box_text(rng):
    """A box line: half plausible boxes (one field sometimes spoiled), half random fields; 4 fields mostly,
    else 8 (a polygon), 3, 5 or none; comma, tab, space, mixed or wrong separators."""
    if rng.random() < 0.5:
        fields = [f"{v:.{rng.integers(0, 3)}f}" for v in rng.uniform([-10, -10, 1, 1], [45, 33, 40, 30])]
        if rng.random() < 0.5:
            fields[rng.integers(4)] = str(rng.choice(FUZZ_FIELDS))
    else:
        n = int(rng.choice([4, 4, 4, 8, 8, 3, 5, 0]))
        fields = [str(rng.choice(FUZZ_FIELDS)) if rng.random() < 0.4 else f"{rng.uniform(-20, 60):.1f}"
                  for _ in range(n)]
    return "".join(f + str(rng.choice(FUZZ_SEPS)) for f in fields[:-1]) + (fields[-1] if fields else "")


def fuzz_box_fits(line, W=FUZZ_W, H=FUZZ_H):
    """The documented rule, written out on its own: 4 numbers (or 8: a polygon's bounding box), all finite,
    w and h > 0, overlapping the W x H image, at most 10 times its width / height."""
    try:
        v = np.array([float(p) for p in re.split(r"[,\s]+", line.strip()) if p])
    except ValueError:
        return False
    with np.errstate(all="ignore"):
        if len(v) == 8:
            v = np.array([v[0::2].min(), v[1::2].min(), np.ptp(v[0::2]), np.ptp(v[1::2])])
        if len(v) != 4 or not np.isfinite(v).all():
            return False
        x, y, w, h = v
        return 0 < w <= 10 * W and 0 < h <= 10 * H and x < W and y < H and x + w > 0 and y + h > 0


def fuzz_mutate(rng, data):
    """Random damage to a file's bytes: truncated, bytes flipped, a zeroed run, garbage appended, emptied,
    replaced by random bytes or by text."""
    kind = rng.choice(["truncate", "flip", "zero", "append", "empty", "random", "text"])
    data = bytearray(data)
    if kind == "truncate":
        return bytes(data[:rng.integers(0, len(data))])
    if kind == "flip":
        for i in rng.integers(0, len(data), rng.integers(1, 20)):
            data[i] = rng.integers(256)
    elif kind == "zero":
        i, n = rng.integers(0, len(data)), rng.integers(1, 200)
        data[i:i + n] = bytes(len(data[i:i + n]))
    elif kind == "append":
        data += rng.bytes(rng.integers(1, 300))
    return {"empty": b"", "random": rng.bytes(rng.integers(1, 2000)),
            "text": b"this is a text file, not media\r\n1,2,3,4\n"}.get(kind, bytes(data))


@pytest.fixture
def fuzz_run(capsys, monkeypatch):
    """track.main(argv) on one fuzz case -> its exit code, after checking the documented outcome.

    One small untrained network serves every run without --ckpt; a spy on run_tracker's on_frame records
    each frame's size and box, so every box is checked against the frame it belongs to. One torch thread:
    on a CPU shared with other jobs, more threads than free cores run many times slower.
    """
    net, load, real = pntrack.PNTrack(FUZZ_CFG), track.load_network, track.run_tracker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(track, "load_network", lambda args: load(args) if args.ckpt else net)
    seen = []

    def spy(tracker, frames, box, on_frame=None, *rest):
        def record(i, image, b):
            seen.append((track.image_size(image), np.array(b, float)))
            if on_frame:
                on_frame(i, image, b)
        return real(tracker, frames, box, record, *rest)
    monkeypatch.setattr(track, "run_tracker", spy)

    def run_case(argv, names=(), expect=None):
        seen.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = track.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        case = (argv, code, err)
        assert not caught, (case, [str(w.message) for w in caught])
        assert "Traceback" not in out + err and "np.float64(" not in out + err, case
        assert code in (0, 2) and (expect is None or code == expect), case
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), case
            assert all(str(n) in lines[0] for n in names), case
            return code
        assert all(line.startswith("warning: ") for line in err.splitlines()), case
        result = read_result(argv[argv.index("--out") + 1])       # checks x,y,w,h with 2 decimals: no NaN
        assert len(result) == len(seen) >= 1, case
        assert np.allclose(result, [b for _, b in seen], atol=0.006), case
        (W, H), (x, y, w, h) = seen[0]             # the given box (unrounded: it may be a tiny one)
        assert x < W and y < H and x + w > 0 and y + h > 0, case
        for i, (size, _) in enumerate(seen[1:], 1):
            (W, H), (x, y, w, h) = size or (0, 0), result[i]
            if size is None:                       # an undecodable frame repeats the box before it
                assert np.array_equal(result[i], result[i - 1]), case
            else:
                assert 0 < w and 0 < h and -0.01 <= x and -0.01 <= y and x + w <= W + 0.01 and y + h <= H + 0.01, case
        return code
    yield run_case
    torch.set_num_threads(threads)


def fuzz_report(kind, codes):
    assert len(codes) == FUZZ_CASES[kind]
    print(f"\nfuzz {kind}: {len(codes)} cases ({codes.count(0)} ran, {codes.count(2)} refused with one line), "
          f"0 tracebacks, 0 NaN boxes; {sum(FUZZ_CASES.values())} fuzz cases in all")


def test_fuzz_box_argument(fuzz_run, tmp_path):
    rng = np.random.default_rng(101)
    folder = write_clip(tmp_path / "seq", fuzz_frames())
    codes = []
    for k in range(FUZZ_CASES["box"]):
        text = fuzz_box_text(rng)
        codes.append(fuzz_run([folder, f"--box={text}", "--out", tmp_path / f"r{k}.txt"], names=["--box"],
                              expect=0 if fuzz_box_fits(text) else 2))
    fuzz_report("box", codes)
    assert min(codes.count(0), codes.count(2)) >= 10          # both outcomes well covered


def fuzz_gt_bytes(rng):
    """A ground-truth file: mostly FUZZ_N box lines (sometimes 1, N - 1 or N + 1), the first line a fuzzed box,
    later lines plausible or NaN / inf / zero-size / huge / malformed, LF, CRLF, CR or mixed line ends,
    blank lines; or an empty file, blank lines only, random bytes."""
    kind = rng.choice(["lines"] * 6 + ["empty", "blank", "random"])
    if kind != "lines":
        return {"empty": b"", "blank": b"\n \r\n\t\n", "random": rng.bytes(rng.integers(1, 300))}[kind]
    n = int(rng.choice([FUZZ_N] * 5 + [1, FUZZ_N - 1, FUZZ_N + 1]))
    lines = [fuzz_box_text(rng) if rng.random() < 0.7 else FUZZ_BOX.replace(",", str(rng.choice(FUZZ_SEPS[:3])))]
    for _ in range(n - 1):
        lines.append(str(rng.choice(["12,9,16,12", "nan,nan,nan,nan", "inf,1,2,3", "1,1,0,0", "1e300,1,1e300,5",
                                     "-3\t4\t10\t10", "5 5 10 10", "1,2,3,4,5,6,7,8"] * 3 + ["1,2,3", "x,y,w,h"])))
    ends = [str(rng.choice(["\n", "\r\n", "\r", "\n\n"])) for _ in lines]
    return "".join(l + e for l, e in zip(lines, ends)).encode()


def fuzz_gt_outcome(path):
    """Exit code track.py must give for a sequence of FUZZ_N frames with this ground-truth file, and whether
    train.py must use the sequence (it reads the first box only)."""
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
    except UnicodeDecodeError:
        return 2, False
    if not lines:
        return 2, False
    first = fuzz_box_fits(lines[0])

    def parses(line):
        try:
            return len([float(p) for p in re.split(r"[,\s]+", line.strip()) if p]) in (4, 8)
        except ValueError:
            return False
    ok = all(parses(line) for line in lines) and len(lines) in (1, FUZZ_N) and first
    return (0 if ok else 2), first


def test_fuzz_ground_truth_files_in_track_and_train(fuzz_run, tmp_path, capsys):
    rng = np.random.default_rng(102)
    frames, root, codes, usable = fuzz_frames(), tmp_path / "data", [], set()
    for k in range(FUZZ_CASES["groundtruth"]):
        folder = write_clip(root / f"s{k:02d}", frames)
        gt = os.path.join(folder, str(rng.choice(["groundtruth.txt", "groundtruth_rect.txt"])))
        open(gt, "wb").write(fuzz_gt_bytes(rng))
        expect, first_ok = fuzz_gt_outcome(gt)
        codes.append(fuzz_run([folder, "--out", tmp_path / f"r{k}.txt"], names=[folder], expect=expect))
        usable |= {f"s{k:02d}"} if first_ok else set()
    # training reads each first box: exactly the usable sequences are found, every other one is one line
    found, problems = train.find_sequences(str(root), tiny())
    assert {s.name for s in found} == usable and len(problems) == FUZZ_CASES["groundtruth"] - len(usable)
    assert all("\n" not in p and "groundtruth" in p and "np.float64(" not in p for p in problems), problems
    # and the training data over all of them gives finite samples (train.main itself: test_only_the_first_box...)
    data = train.CycleData(found, tiny(), 8, seed=0)
    assert len(usable) >= 5 and all(torch.isfinite(data[i][3]).all() for i in range(8))
    err = capsys.readouterr().err                 # a sub-pixel first box passes find_sequences, not make_sample
    assert all(line.startswith("warning: skipping sequence ") for line in err.splitlines()), err
    fuzz_report("groundtruth", codes)


@pytest.mark.slow
def test_fuzz_frame_files_in_track_and_train(fuzz_run, tmp_path, capsys):
    rng = np.random.default_rng(103)
    frames, cfg, codes = fuzz_frames(), tiny(), []
    for k in range(FUZZ_CASES["frames"]):
        folder, damaged = write_clip(tmp_path / f"s{k:02d}", frames, sub=""), []
        open(os.path.join(folder, "groundtruth.txt"), "w").write(FUZZ_BOX + "\n")
        for j in {0 if rng.random() < 0.3 else int(rng.integers(1, FUZZ_N)) for _ in range(rng.integers(1, 3))}:
            path = os.path.join(folder, f"{j + 1:08d}.jpg")
            kind = rng.choice(["bytes", "bytes", "resized", "grey", "rgba png", "tiny"])
            if kind == "bytes":                              # truncated, flipped, empty, random, text, ...
                data = open(path, "rb").read()
                open(path, "wb").write(fuzz_mutate(rng, data))
                damaged.append(path)
            else:                                            # another size or mode (a PNG named .jpg too)
                w, h = (1, 1) if kind == "tiny" else rng.integers([8, 8], [120, 90])
                mode = {"grey": "L", "rgba png": "RGBA"}.get(kind, "RGB")
                image = Image.fromarray(texture(h, w, k)).convert(mode)
                image.save(path, format="PNG" if kind == "rgba png" else "JPEG")
        try:                                                  # what the first frame is, as Pillow sees it
            first = extras.media.read_image(os.path.join(folder, "00000001.jpg")).size
        except ValueError:
            first = None
        fits = first is not None and fuzz_box_fits(FUZZ_BOX, *first)
        names = [folder] if first is not None else [os.path.join(folder, "00000001.jpg")]    # an unreadable first frame
        codes.append(fuzz_run([folder, "--box", FUZZ_BOX, "--out", tmp_path / f"r{k}.txt"], names=names,
                              expect=0 if fits else 2))
        # training: used iff the first frame and box are; a sample is finite, or a damaged later frame it read
        # raises the one line CycleData drops the sequence with
        found, problems = train.find_sequences(folder, cfg)
        assert len(found) == fits and len(problems) == (not fits), problems
        for seq in found:
            try:
                sample = train.make_sample(seq, cfg, np.random.default_rng(k))
            except ValueError as e:
                assert any(str(e).startswith(f"{p}: unreadable image") for p in damaged) and "\n" not in str(e), e
            else:
                assert all(torch.isfinite(t.float()).all() for t in sample[:4])
        err = capsys.readouterr().err
        assert all(line.startswith("warning: ") for line in err.splitlines()) and "np.float64(" not in err, err
    fuzz_report("frames", codes)


@pytest.mark.parametrize("kind", ["video", "gif"])
def test_fuzz_video_and_gif_files(kind, fuzz_run, tmp_path, capsys):
    rng = np.random.default_rng(104 if kind == "video" else 105)
    frames = fuzz_frames()
    good = write_clip(tmp_path / ("good.mp4" if kind == "video" else "good.gif"), frames)
    data, codes = open(good, "rb").read(), []
    for k in range(FUZZ_CASES[kind]):
        ext = str(rng.choice([".mp4", ".avi", ".mkv"])) if kind == "video" else ".gif"
        path = str(tmp_path / f"c{k:02d}{ext}")
        open(path, "wb").write(fuzz_mutate(rng, data) if k else data)      # case 0: the file undamaged
        codes.append(fuzz_run([path, "--box", FUZZ_BOX, "--out", tmp_path / f"r{k}.txt"], names=[path],
                              expect=0 if k == 0 else None))
        if kind == "video" and k % 2:                         # training: a video with a sidecar box file
            root = tmp_path / f"v{k:02d}"
            root.mkdir()
            shutil.copy(path, root / f"clip{ext}")
            (root / "clip.txt").write_text(FUZZ_BOX + "\n")
            found, problems = train.find_sequences(str(root), tiny())
            assert len(found) + len(problems) == 1
            for seq in found:                                 # a finite sample, or the one line CycleData drops it with
                try:
                    sample = train.make_sample(seq, tiny(), np.random.default_rng(k))
                except ValueError as e:
                    assert str(e) == f"{root / f'clip{ext}'}: no frame could be decoded", e
                else:
                    assert all(torch.isfinite(t.float()).all() for t in sample[:4])
            err = capsys.readouterr().err
            assert all(line.startswith("warning: ") for line in err.splitlines()), err
    fuzz_report(kind, codes)


def fuzz_weight_files(rng, tmp_path, n):
    """n checkpoint-like files: (name, bytes, outcome as --ckpt, outcome as --pretrained); outcome 0 (loads), 2 (one
    error line) or None (random damage: either). First torch.save of known objects, then damaged real checkpoints."""
    pntrack.save_checkpoint(str(tmp_path / "real.pt"), pntrack.PNTrack(FUZZ_CFG))
    real, state = (tmp_path / "real.pt").read_bytes(), torch.load(tmp_path / "real.pt", weights_only=True)
    weights, cfg = state["model"], state["config"]
    inf = dict(weights)
    first = next(k for k, v in weights.items() if v.is_floating_point())
    inf[first] = torch.full_like(weights[first], float("inf"))
    # an MAE ViT's patch embedding fits the patch16 stem only; a pntrack.pt passed to --pretrained is loaded whole,
    # by its tensor names (its config is not read), so a config track.py refuses does not matter there
    mae = 0 if FUZZ_CFG.stem == "patch16" else 2
    known = [("list", [1, 2, 3], 2, 2), ("dict of strings", {"a": "b"}, 2, 2), ("string", "a string", 2, 2),
             ("int", 42, 2, 2), ("None", None, 2, 2), ("tensor", torch.zeros(3), 2, 2),
             ("empty model", {"model": {}}, 2, 2), ("empty config", {"config": {}, "model": weights}, 2, 0),
             ("config a list", {"config": [1], "model": weights}, 2, 0), ("no model", {"config": cfg}, 2, 2),
             ("other tensors", {"config": cfg, "model": {"x": torch.zeros(2)}}, 2, 2),
             ("another depth", {"config": dict(cfg, depth=2), "model": weights}, 2, 0),
             ("NaN weights", {"config": cfg, "model": {k: v * float("nan") for k, v in weights.items()}}, 2, 2),
             ("inf weights", {"config": cfg, "model": inf}, 2, 2),
             ("pos_embed 1-d", {"model": {"pos_embed": torch.zeros(5)}}, 2, 2),
             ("pos_embed empty", {"model": {"pos_embed": torch.zeros(1, 0, 192)}}, 2, 2),
             ("int key", {"model": {1: torch.zeros(2)}}, 2, 2),
             ("MAE weights", {"model": fake_mae_checkpoint(FUZZ_CFG)}, 2, mae),
             ("the real checkpoint", {"config": cfg, "model": weights}, 0, 0)]
    for i in range(n):
        if i < len(known):
            name, obj, as_ckpt, as_pretrained = known[i]
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            yield name, buffer.getvalue(), as_ckpt, as_pretrained
        else:
            yield "damaged", fuzz_mutate(rng, real), None, None


def test_fuzz_checkpoint_files(fuzz_run, tmp_path):
    rng = np.random.default_rng(106)
    folder = write_clip(tmp_path / "seq", fuzz_frames())
    codes = []
    for k, (name, data, expect, _) in enumerate(fuzz_weight_files(rng, tmp_path, FUZZ_CASES["checkpoint"])):
        path = tmp_path / f"c{k:02d}.pt"
        path.write_bytes(data)
        codes.append(fuzz_run([folder, "--box", FUZZ_BOX, "--ckpt", path, "--out", tmp_path / f"r{k}.txt"],
                              names=[path], expect=expect))
    fuzz_report("checkpoint", codes)


def test_fuzz_pretrained_files(tmp_path, capsys):
    rng = np.random.default_rng(107)
    codes = []
    files = list(fuzz_weight_files(rng, tmp_path, FUZZ_CASES["pretrained"] - 1)) + [("missing", None, None, 2)]
    for k, (name, data, _, expect) in enumerate(files):
        path = tmp_path / f"p{k:02d}.pth"
        if data is not None:
            path.write_bytes(data)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pntrack.load_pretrained(pntrack.PNTrack(FUZZ_CFG), str(path))
            codes.append(0)                                   # loadable: training would start from it
        except ValueError as e:
            assert str(path) in str(e) and "\n" not in str(e), e
            codes.append(2)
        finally:
            assert not caught, [str(w.message) for w in caught]
        assert expect is None or codes[-1] == expect, (name, codes[-1])
        if codes[-1] == 0 or (codes.count(2) > 3 and "weights" not in name):
            continue                                          # the same code path: a few runs of train.py show it
        # not loadable (NaN / inf weights always among them): train.py stops before training, with one line
        code = short_run(tmp_path / "out", pretrained=path)
        out, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --pretrained {path}: "), (name, err)
        assert "Traceback" not in err and "np.float64(" not in err
    fuzz_report("pretrained", codes)
