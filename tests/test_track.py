"""track.py: the got10k-compatible metrics, the tracking loop, the command line on every input kind (built in the
tests by conftest.py's clip factory), the shipped weights, the demo, and the rows of docs/BAD_INPUT.md that the fuzz
tests (tests/test_fuzz.py) do not pin down.
"""
import os
import re
import shutil
import time
from dataclasses import replace

import av
import numpy as np
import pytest
import torch
from PIL import Image

import extras.media
import extras.split
import extras.synth
import pntrack
import track
import train
from conftest import (CLIP_N, FAST_CFG, ROOT, ConstantNet, count_frames, make_clip, printed_scores, read_result, run,
                      shared_data, tiny, write_clip)

# --- what the shipped weights must score (re-measure and move these when the weights change) -------------------
# The demo: mean IoU of the shipped weights on the hand-drawn frames of the demo clip. Measured with
# `pytest -q -k demo_with_no_arguments -s` (it prints the mean IoU and the static first box's): the weights shipped
# with issue 24 (pool3, --first-template, verified moves) score 0.672 on the 2-core Intel Xeon VM with the thread-
# independent sums (0.674 with the sums before); the weights before them 0.470 on the AMD EPYC VM and 0.340 on the
# Xeon; the static first box 0.382. A box that leaves the rabbit scores below 0.1 on these frames; the floor sits
# 0.11 under the measurement, room for float differences between machines, and above the static box.
DEMO_IOU_FLOOR = 0.55
DEMO_GT = os.path.splitext(track.DEMO_CLIP)[0] + "_gt.txt"     # frame_index,x,y,w,h lines drawn by hand
# The test sequences (../shared): each AUC within this of the README's table
README_AUC_TOLERANCE = 0.01
# 8 held-out generated clips (simple style, 40 frames), in every run, ../shared or not. Measured (2026-11-28
# afternoon, 1 thread, the effnet-lite0 weights shipped then: search 3x, window power 2, kept aspect): 0.392 vs the
# static box 0.269; without the hold, window 0.383 vs flat 0.233 (the morning's weights: 0.338 vs 0.269, window 0.320
# vs flat 0.225; the first design's: 0.363 vs 0.269, window 0.339 vs flat 0.265). Margins below about half of those
# gaps, since another CPU's float sums can flip a few frames
GENERATED_MARGIN_OVER_STATIC, GENERATED_MARGIN_OVER_FLAT_WINDOW = 0.015, 0.03


# --- the metrics (got10k toolkit's definitions) ------------------------------------------------------------

def box_rows(*rows):
    return np.array(rows, dtype=float)


def test_perfect_track_scores_auc_20_of_21_and_full_precision_and_ao():
    gt = box_rows([10, 10, 40, 30], [12, 11, 40, 30], [15, 13, 42, 31])
    s = track.evaluate(gt.copy(), gt)
    # IoU = 1 passes every threshold but the last (strict IoU > 1.0): 20 of 21, as in the got10k toolkit
    assert s["auc"] == pytest.approx(20 / 21)
    assert s["precision"] == 1.0 and s["norm_precision"] == 1.0
    assert s["ao"] == pytest.approx(1.0) and s["sr50"] == 1.0 and s["sr75"] == 1.0
    assert s["frames"] == 3


def test_disjoint_boxes_score_zero():
    gt = box_rows([0, 0, 10, 10], [20, 0, 10, 10], [40, 0, 10, 10])
    pred = gt + [25, 0, 0, 0]                                # 15 px apart, centres 25 px apart
    s = track.evaluate(pred, gt)
    assert s["auc"] == 0.0 and s["ao"] == 0.0 and s["precision"] == 0.0 and s["sr50"] == 0.0


def test_shift_by_half_the_width_gives_iou_one_third_and_auc_7_of_21():
    # overlap = w/2 * h, union = 1.5 w h -> IoU = 1/3; thresholds 0, 0.05, ..., 0.30 (7 of 21) are below it
    gt = box_rows([10, 10, 40, 20], [50, 30, 40, 20], [90, 50, 40, 20])
    pred = gt + [20, 0, 0, 0]
    assert np.allclose(track.rect_iou(pred, gt), 1 / 3)
    s = track.evaluate(pred, gt)
    assert s["auc"] == pytest.approx(7 / 21)
    assert s["ao"] == pytest.approx(1 / 3) and s["sr50"] == 0.0 and s["sr75"] == 0.0
    # the centres are 20 px apart: on the 20 px precision threshold, which counts
    assert s["precision"] == 1.0


def test_centre_error_of_exactly_20px_counts_and_20_5px_does_not():
    gt = box_rows([100, 100, 30, 30], [100, 100, 30, 30])
    assert track.evaluate(gt + [0, 0, 0, 0], gt)["precision"] == 1.0
    assert track.evaluate(gt + [[0, 0, 0, 0], [12, 16, 0, 0]], gt)["precision"] == 1.0   # 3-4-5: 20 px
    assert track.evaluate(gt + [[0, 0, 0, 0], [20.5, 0, 0, 0]], gt)["precision"] == 0.5
    # normalised precision: error in units of the GT size, threshold 0.2 -> 6 px on a 30 px box counts
    assert track.evaluate(gt + [[0, 0, 0, 0], [6, 0, 0, 0]], gt)["norm_precision"] == 1.0
    assert track.evaluate(gt + [[0, 0, 0, 0], [6.5, 0, 0, 0]], gt)["norm_precision"] == 0.5
    # in units of the ground truth's size, not the prediction's: 9 px off with a box twice as large is 0.3, not 0.15
    assert track.evaluate(gt + [[0, 0, 0, 0], [9 - 15, -15, 30, 30]], gt)["norm_precision"] == 0.5


def test_frames_with_nan_or_zero_size_ground_truth_are_skipped():
    gt = box_rows([10, 10, 20, 20], [np.nan] * 4, [30, 30, 0, 20], [12, 12, 20, 20])
    pred = box_rows([10, 10, 20, 20], [500, 500, 5, 5], [500, 500, 5, 5], [12, 12, 20, 20])
    s = track.evaluate(pred, gt)       # only frames 0 and 3 count, and both are perfect
    assert s["frames"] == 2
    assert s["auc"] == pytest.approx(20 / 21) and s["precision"] == 1.0 and s["ao"] == pytest.approx(1.0)


def test_got10k_ao_leaves_out_the_first_frame():
    gt = box_rows([0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10])
    pred = box_rows([0, 0, 10, 10], [50, 50, 10, 10], [50, 50, 10, 10])   # only the given first frame is right
    s = track.evaluate(pred, gt)
    assert s["ao"] == 0.0 and s["sr50"] == 0.0                         # OTB's AUC does count the first frame:
    assert s["auc"] == pytest.approx((20 / 21) / 3)


# --- the tracking loop ------------------------------------------------------------------------------------

class ScriptedTracker:
    """Stands in for pntrack.Tracker: returns boxes from a script and records what it was given."""
    def __init__(self, outputs):
        self.outputs, self.seen, self.model_seconds, self.held = list(outputs), [], 0.0, 0

    def init(self, image, box):
        self.seen.append(("init", image))

    def update(self, image):
        self.seen.append(("update", image))
        self.model_seconds += 0.001
        return np.array(self.outputs.pop(0), float)


def test_run_tracker_repeats_the_last_box_for_an_undecodable_frame_and_leaves_on_frame_out_of_the_time():
    tracker = ScriptedTracker([[1, 1, 5, 5], [3, 3, 5, 5]])
    calls = []

    def slow_callback(i, image, box):
        calls.append((i, image, tuple(box)))
        time.sleep(0.05)

    out, total, model = track.run_tracker(tracker, ["a", "b", None, "d"], (0, 0, 5, 5), slow_callback)
    assert np.allclose(out, [[0, 0, 5, 5], [1, 1, 5, 5], [1, 1, 5, 5], [3, 3, 5, 5]])
    assert tracker.seen == [("init", "a"), ("update", "b"), ("update", "d")]     # None never reaches it
    assert [c[0] for c in calls] == [0, 1, 2, 3] and calls[2][1] is None
    assert total < 0.1 and model == pytest.approx(0.002)                          # 4 x 0.05 s not counted


def test_model_fps_counts_only_the_frames_the_network_saw():
    tracker = ScriptedTracker([[1, 1, 5, 5], [2, 2, 5, 5], [3, 3, 5, 5]])
    seq = dict(name="s", frames=iter(["a", "b", None, "d", "e"]), n=5, gt=None, box=(0, 0, 5, 5), fps=30)
    boxes_, total, model, seen = track.track_sequence(tracker, seq, "s")
    assert len(boxes_) == 5 and seen == 3                    # not the first (init) nor the undecodable one
    tracker.device, tracker.cfg = torch.device("cpu"), tiny()
    n = torch.get_num_threads()
    assert track.speed_line(12, 2.0, 0.5, 10, tracker) == \
        f"speed: 20.0 FPS model, 6.0 FPS end to end (cpu, {n} thread{'s' * (n > 1)}, tiny, 12 frames); " \
        f"box held on 0 of 10 frames (peak score < {tracker.cfg.hold_below_score:g}" \
        + " or the old box more like the first template" * tracker.cfg.verify_move + ")"
    tracker.cfg = tiny(hold_below_score=0, verify_move=False)              # neither rule: no held count at all
    assert track.speed_line(12, 2.0, 0.5, 10, tracker).endswith("tiny, 12 frames)")


def test_frames_that_change_size_unevenly_move_x_and_w_with_the_width_and_y_and_h_with_the_height(capsys):
    small, wide = make_clip(2, (48, 36), side=12, start=(10, 8))[0], make_clip(2, (96, 54), side=24, start=(20, 12))[0]
    tracker = pntrack.Tracker(ConstantNet(tiny(hold_below_score=0.5)), device="cpu")   # peak 0.3 < 0.5: it holds its box
    boxes, _, _ = track.run_tracker(tracker, small + wide, (10, 8, 16, 12), name="clip")
    assert np.allclose(boxes, [[10, 8, 16, 12]] * 2 + [[20, 12, 32, 18]] * 2)   # x, w times 2; y, h times 1.5
    assert capsys.readouterr().err == "warning: clip: frame 3 is 96x54, earlier frames were 48x36; the box is " \
                                      "rescaled to the new size\n"


# --- the command line: every input kind, result files, scores, saved videos ------------------------------------

@pytest.mark.parametrize("kind", ["mp4", "folder", "gif"])
def test_each_input_kind_gives_one_box_line_per_frame_starting_with_the_given_box(kind, ckpt, clip, tmp_path, capsys):
    source = write_clip(tmp_path / {"mp4": "clip.mp4", "folder": "frames", "gif": "clip.gif"}[kind], clip[0], sub="")
    code, out, err = run(capsys, source, "--box", "20,30,30,30", "--out", tmp_path / "res.txt",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "res.txt")
    assert result.shape == (CLIP_N, 4) and np.array_equal(result[0], [20, 30, 30, 30])
    assert "AUC" not in out                                  # no ground truth here: nothing scored
    speed = re.search(r"speed: (\d+\.\d) FPS model, (\d+\.\d) FPS end to end "
                      r"\(cpu, \d+ threads?, tiny, (\d+) frames\)", out)
    assert speed and int(speed.group(3)) == CLIP_N and float(speed.group(1)) > 0


def test_frames_option_stops_after_n_frames(ckpt, clip, tmp_path, capsys):
    source = write_clip(tmp_path / "clip.mp4", clip[0])
    code, out, err = run(capsys, source, "--box", "20,30,30,30", "--frames", 5, "--out", tmp_path / "r.txt",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    assert len(read_result(tmp_path / "r.txt")) == 5 and "tiny, 5 frames)" in out


def test_sequence_folder_starts_from_its_first_gt_line_and_prints_the_scores_of_the_result_file(
        ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    gt[0] = [19.5, 30.25, 30, 30.5]                          # a first box no default could guess
    seq = write_clip(tmp_path / "seq1", frames, gt)
    code, out, err = run(capsys, seq, "--out", tmp_path / "r.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "r.txt")
    assert len(result) == CLIP_N and np.array_equal(result[0], gt[0])
    s = track.evaluate(result, extras.media.read_boxes(os.path.join(seq, "groundtruth.txt")))
    expected = [100 * s[k] for k in track.SCORES]
    assert np.allclose(printed_scores(out), expected, atol=0.05 + 1e-9)
    assert f"({CLIP_N} frames with ground truth)" in out


def test_one_line_ground_truth_is_a_first_box_only_and_is_not_scored(ckpt, clip, tmp_path, capsys):
    frames, gt = clip                                         # GOT-10k's test split ships only the first box
    seq = write_clip(tmp_path / "seq", frames, gt[:1])
    code, out, err = run(capsys, seq, "--out", tmp_path / "r.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "r.txt")
    assert len(result) == CLIP_N and np.array_equal(result[0], gt[0]) and "AUC" not in out


def test_dataset_root_writes_a_file_per_sequence_a_table_with_the_mean_and_a_plot(ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    root = tmp_path / "dataset"
    write_clip(root / "b_reversed", frames[::-1][:8], gt[::-1][:8])     # sorted by name: a_... first
    write_clip(root / "a_forward", frames, gt)
    os.makedirs(root / "notes")                                          # not a sequence: ignored
    code, out, err = run(capsys, root, "--out", tmp_path / "res", "--plot", tmp_path / "curves.png",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "res")) == ["a_forward.txt", "b_reversed.txt"]
    scores = []
    for name, g in (("a_forward", gt), ("b_reversed", gt[::-1][:8])):
        result = read_result(tmp_path / "res" / f"{name}.txt")
        assert len(result) == len(g) and np.array_equal(result[0], g[0])
        scores.append(track.evaluate(result, g))
    rows = [line.split() for line in out.splitlines() if line.startswith(("a_forward", "b_reversed", "mean"))]
    assert [r[0] for r in rows] == ["a_forward", "b_reversed", "mean"]
    for row, s in zip(rows, scores):                                      # per sequence: frames, 6 scores, FPS
        assert int(row[1]) == s["frames"]
        assert np.allclose([float(v) for v in row[2:8]], [100 * s[k] for k in track.SCORES], atol=0.05 + 1e-9)
    mean_auc = 100 * np.mean([s["auc"] for s in scores])                  # mean of per-sequence scores
    assert rows[2][1:3] == ["(2", "sequences)"] and float(rows[2][4]) == pytest.approx(mean_auc, abs=0.05 + 1e-9)
    with Image.open(tmp_path / "curves.png") as plot:
        pixels = np.asarray(plot.convert("RGB")).reshape(-1, 3).astype(int)
    red = (pixels[:, 0] > 180) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)
    assert plot.size == (880, 360) and red.sum() > 200                    # both curves were drawn


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_saved_video_has_one_frame_per_box(suffix, ckpt, clip, tmp_path, capsys):
    source = write_clip(tmp_path / "clip.mp4", clip[0])
    out_file = tmp_path / "out" / f"tracked{suffix}"                      # the folder is created
    code, out, err = run(capsys, source, "--box", "20,30,30,30", "--save", out_file, "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    assert count_frames(out_file) == CLIP_N


def test_saved_mp4_pads_odd_frame_sizes_to_even(ckpt, tmp_path, capsys):
    frames, gt = make_clip(4, (161, 121), side=30, start=(20, 30))      # H.264 4:2:0 needs even sizes
    seq = write_clip(tmp_path / "odd", frames, gt)
    code, out, err = run(capsys, seq, "--save", tmp_path / "odd.mp4", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    with av.open(str(tmp_path / "odd.mp4")) as container:
        first = next(container.decode(video=0))
        assert (first.width, first.height) == (162, 122)
        # the saved picture is the frame with the box drawn in red (the square itself has green >= 128)
        image = np.asarray(first.to_image()).astype(int)
    red = image[int(gt[0, 1]) + 10, int(gt[0, 0])]                    # on the box's left edge
    assert red[0] > 150 and red[1] < 100 and red[2] < 100


def test_help_exits_0_and_shows_the_typical_commands(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and "examples:" in out and "python track.py video.mp4 --box" in out
    assert out.startswith("usage: track.py ") and "helps on a GPU only" in " ".join(out.split())


# --- which weights: out/pntrack.pt, else the shipped ones; what the shipped weights score ----------------------

def test_track_uses_out_pntrack_pt_when_present_else_the_shipped_weights(clip, ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = write_clip(tmp_path / "good", clip[0][:3])
    code, out, err = run(capsys, good, "--box", "20,30,30,30")
    assert code == 0, err
    assert f"checkpoint: {track.SHIPPED_CKPT} (the shipped weights)" in out
    os.makedirs("out")
    shutil.copy(ckpt, os.path.join("out", "pntrack.pt"))
    code, out, err = run(capsys, good, "--box", "20,30,30,30")
    assert code == 0, err
    assert f"checkpoint: {os.path.join('out', 'pntrack.pt')}\n" in out and "shipped" not in out


def test_shipped_weights_are_an_fp16_export_with_the_tiny_presets_tracker_settings():
    assert os.path.getsize(track.SHIPPED_CKPT) <= 10 * 10 ** 6          # issue 17: at most 10 MB
    state = torch.load(track.SHIPPED_CKPT, map_location="cpu", weights_only=True)     # no pickle needed
    assert state["config"]["name"] == "tiny"
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    assert len(floats) > 50 and all(v.dtype == torch.float16 for v in floats)
    net = pntrack.load_checkpoint(track.SHIPPED_CKPT)        # strict: exactly the tensors of its config's network
    assert next(net.parameters()).dtype == torch.float32
    assert all(torch.equal(net.state_dict()[k].half(), v) for k, v in state["model"].items() if v.is_floating_point())
    # what `train.py --export` writes: the tracker settings of the tiny preset as it is now (a preset change
    # after the export would leave the shipped file tracking with the old ones)
    preset = tiny()
    assert {k: getattr(net.cfg, k) for k in train.TRACKER_FIELDS} == {k: getattr(preset, k) for k in train.TRACKER_FIELDS}


@pytest.mark.slow
def test_shipped_weights_track_generated_clips_better_than_the_static_box_and_their_window_helps():
    # the trained network's score maps, the Hann window and the box decoding on 8 held-out generated clips
    net = pntrack.load_checkpoint(track.SHIPPED_CKPT)
    clips = extras.synth.held_out_clips(8, n_frames=40, style="simple")
    gts = [np.stack([c.box(t) for t in range(len(c))]) for c in clips]
    frames = [[c.frame(t) for t in range(len(c))] for c in clips]

    def mean_auc(net, window=True):
        tracker = pntrack.Tracker(net, device="cpu")
        if not window:
            tracker.window = torch.ones_like(tracker.window)
        return np.mean([track.evaluate(track.run_tracker(tracker, f, g[0])[0], g)["auc"] for f, g in zip(frames, gts)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        static = np.mean([track.evaluate(np.repeat(g[:1], len(g), 0), g)["auc"] for g in gts])
        ours = mean_auc(net)
        # the preset holds the box on unsure frames (most frames here), where the window plays no part; without
        # the hold and the verification, the window's preference for the last position keeps the tracker off the distractors
        net.cfg = replace(net.cfg, hold_below_score=0.0, verify_move=False)    # (verification damps moves too)
        windowed, flat = mean_auc(net), mean_auc(net, window=False)
    finally:
        torch.set_num_threads(threads)
    print(f"shipped weights on 8 generated clips: AUC {ours:.3f} (static box {static:.3f}); without the hold "
          f"{windowed:.3f}, and with a flat window {flat:.3f}")
    assert ours > static + GENERATED_MARGIN_OVER_STATIC and windowed > flat + GENERATED_MARGIN_OVER_FLAT_WINDOW, \
        (ours, static, windowed, flat)


@pytest.mark.real_data
def test_shipped_weights_on_the_test_sequences_score_what_the_readme_reports_and_beat_the_static_box(capsys):
    sequences = shared_data("sequences")
    if not all(os.path.isdir(os.path.join(sequences, n)) for n in extras.split.TEST_SEQUENCES):
        pytest.skip("../shared/data/sequences lacks the test sequences")
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    ours, static = [], []
    for name in extras.split.TEST_SEQUENCES:
        row = next(l for l in readme if l.startswith(f"| {name} | "))      # the shipped weights' test table
        cells = row.split("|")
        aucs = []
        for threads in ("1", "2"):                                     # the README's column "shipped, 1 and 2 threads"
            code, out, err = run(capsys, os.path.join(sequences, name), "--ckpt", track.SHIPPED_CKPT, "--threads", threads)
            assert code == 0, err
            aucs.append(printed_scores(out)[0] / 100)
            assert abs(aucs[-1] - float(cells[7].strip(" *"))) <= README_AUC_TOLERANCE, (name, threads, aucs[-1], cells[7])
        assert aucs[0] == aucs[1], (name, aucs)                         # one result whatever the thread count
        ours += aucs
        static.append(float(cells[2]))
    assert np.mean(ours) > np.mean(static) + 0.1, (ours, static)


@pytest.mark.real_data
def test_real_sequence_runs_end_to_end_with_scores(ckpt, tmp_path, capsys):
    seq = shared_data("sequences", "otb_Dudek_first20")
    code, out, err = run(capsys, seq, "--out", tmp_path / "dudek.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "dudek.txt")
    gt = extras.media.read_boxes(os.path.join(seq, "groundtruth.txt"))
    assert len(result) == 20 and np.allclose(result[0], gt[0])
    s = track.evaluate(result, gt)
    assert np.allclose(printed_scores(out), [100 * s[k] for k in track.SCORES], atol=0.05 + 1e-9)
    assert "otb_Dudek_first20: AUC" in out and "tiny, 20 frames)" in out


# --- the demo (`python track.py`, no arguments) and sidecar first boxes (issue 19) -------------------------

@pytest.mark.slow
def test_demo_with_no_arguments_tracks_the_shipped_clip_and_overlaps_the_hand_drawn_ground_truth(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                                          # writes out/ here; no out/pntrack.pt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                             # as --threads 1, with the argv left empty
    try:
        code, out, err = run(capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    boxes = read_result(tmp_path / "out" / "demo.txt")
    first, _ = extras.media.sidecar_box(track.DEMO_CLIP)
    assert len(boxes) == count_frames(track.DEMO_CLIP) and np.isfinite(boxes).all() and np.allclose(boxes[0], first)
    gif = tmp_path / "out" / "demo.gif"
    assert count_frames(gif) == len(boxes) and os.path.getsize(gif) < 1_000_000       # fits the README
    assert f"checkpoint: {track.SHIPPED_CKPT} (the shipped weights)" in out
    demo_line = out.strip().splitlines()[-1]
    assert demo_line.startswith("demo: ") and "python track.py your_video.mp4 --box x,y,w,h" in demo_line
    assert os.path.join("out", "demo.txt") in demo_line and os.path.join("out", "demo.gif") in demo_line
    gt = np.loadtxt(DEMO_GT, delimiter=",", comments="#")
    frames = gt[:, 0].astype(int)
    assert len(gt) >= 5 and frames.max() >= len(boxes) - 10                # spread to the end of the clip
    iou = track.rect_iou(boxes[frames], gt[:, 1:]).mean()
    static = track.rect_iou(np.repeat(boxes[:1], len(gt), 0), gt[:, 1:]).mean()
    print(f"demo: mean IoU {iou:.3f} on {len(gt)} hand-drawn frames (static first box {static:.3f})")
    assert iou > DEMO_IOU_FLOOR, (iou, static)


def test_a_video_or_gif_with_a_sidecar_box_needs_no_box_argument_and_box_wins_over_it(ckpt, clip, tmp_path, capsys):
    fast = ["--ckpt", ckpt, "--device", "cpu", "--threads", "1", "--frames", 4, "--out", tmp_path / "r.txt"]
    for name in ("clip.mp4", "anim.gif"):
        source = write_clip(tmp_path / name, clip[0], "\n20 30 30 30\nignored: only the first non-empty line is read\n")
        code, out, err = run(capsys, source, *fast)
        assert code == 0, err
        result = read_result(tmp_path / "r.txt")
        assert len(result) == 4 and np.allclose(result[0], [20, 30, 30, 30])
        code, out, err = run(capsys, source, "--box", "22,31,28,29", *fast)
        assert code == 0, err
        assert np.allclose(read_result(tmp_path / "r.txt")[0], [22, 31, 28, 29])


def test_a_bad_sidecar_box_gives_one_error_line_naming_the_file_and_exit_2(ckpt, clip, tmp_path, capsys):
    video = write_clip(tmp_path / "clip.mp4", clip[0])
    sidecar = str(tmp_path / "clip.txt")
    for content, rule in ((b"1,2,3\n", "expected 4 numbers"), (b"a,b,c,d\n", "expected numbers"),
                          (b"20,30,0,30\n", "zero"), (b"1,1,inf,3\n", "NaN or inf"), (b"\n\n", "empty box file"),
                          (b"\xff\xfe\x00\x81", "not a text file"), (b"500,30,30,30\n", "outside the 160x120 image")):
        with open(sidecar, "wb") as f:
            f.write(content)
        code, out, err = run(capsys, video, "--ckpt", ckpt, "--device", "cpu", "--threads", "1")
        lines = err.strip().splitlines()
        assert code == 2, (content, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and sidecar in lines[0] and rule in lines[0], \
            (content, err)


# --- docs/BAD_INPUT.md: the rows whose outcome the fuzz tests (tests/test_fuzz.py) do not pin down --------------

def bad_inputs(tmp, clip, ckpt):
    """(name, argv, text the one error line must contain) for each kind of bad input."""
    frames, gt = clip
    good = write_clip(tmp / "good", frames)
    (tmp / "empty").mkdir()
    (tmp / "broken.mp4").write_bytes(b"definitely not a video " * 50)
    seqs = {}
    for name, lines in [("columns", ["1,2,3,4"] * 2 + ["1,2,3"] + ["1,2,3,4"] * (CLIP_N - 3)),
                        ("fewer", ["20,30,30,30"] * 5), ("more", ["20,30,30,30"] * (CLIP_N + 1))]:
        seqs[name] = write_clip(tmp / name, frames, "\n".join(lines) + "\n")
    (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    one = os.path.join(good, "img", "00000001.jpg")
    box = ["--box", "20,30,30,30"]
    return [
        ("missing path", [tmp / "nope.mp4"] + box, str(tmp / "nope.mp4")),
        ("folder without images", [tmp / "empty"] + box, str(tmp / "empty")),
        ("a single image", [one] + box, f"{one}: a single image"),
        ("corrupt video", [tmp / "broken.mp4"] + box, str(tmp / "broken.mp4")),
        ("box with 3 numbers", [good, "--box", "1,2,3"], "--box"),
        ("box not numbers", [good, "--box", "a,b,c,d"], "--box"),
        ("box of zero size", [good, "--box", "20,30,0,30"], "--box 20,30,0,30: box (20, 30, 0, 30) has zero"),
        ("box not finite", [good, "--box", "1,1,inf,3"], "--box 1,1,inf,3: box (1, 1, inf, 3) has a NaN or inf"),
        ("box outside the frame", [good, "--box", "500,30,30,30"],
         f"{good}: --box 500,30,30,30: box (500, 30, 30, 30) lies entirely outside the 160x120 image"),
        ("box absurdly large", [good, "--box", "1,1,1e30,3"],
         f"{good}: --box 1,1,1e30,3: box (1, 1, 1e+30, 3) is more than 10 times"),
        ("gt column count", [seqs["columns"]], os.path.join(seqs["columns"], "groundtruth.txt") + ":3"),
        ("gt fewer lines", [seqs["fewer"]], os.path.join(seqs["fewer"], "groundtruth.txt") + f": 5 boxes for {CLIP_N}"),
        ("gt more lines", [seqs["more"]], os.path.join(seqs["more"], "groundtruth.txt") + f": {CLIP_N + 1} boxes for {CLIP_N}"),
        ("box for a dataset root", [tmp] + box, "--box"),
        ("missing checkpoint", [good] + box + ["--ckpt", tmp / "none.pt"], f"{tmp / 'none.pt'}: no such checkpoint"),
        ("not a checkpoint", [good] + box + ["--ckpt", tmp / "junk.pt"], f"{tmp / 'junk.pt'}: not a pntrack"),
    ]


def test_bad_input_returns_2_with_one_line_naming_the_file_or_argument(ckpt, clip, tmp_path, capsys):
    for name, argv, expected in bad_inputs(tmp_path, clip, ckpt):
        if "--ckpt" not in argv:
            argv = argv + ["--ckpt", ckpt]
        code, out, err = run(capsys, *argv, "--device", "cpu")
        lines = err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, err)


def test_missing_or_corrupt_shipped_weights_give_one_line_naming_them_and_how_to_train(clip, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                                          # no out/pntrack.pt here
    good = write_clip(tmp_path / "good", clip[0])
    for name, content in (("missing.pt", None), ("corrupt.pt", b"\x80\x02 not a checkpoint")):
        shipped = tmp_path / name
        if content is not None:
            shipped.write_bytes(content)
        monkeypatch.setattr(track, "SHIPPED_CKPT", str(shipped))
        code, out, err = run(capsys, good, "--box", "20,30,30,30")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert name in err and "python train.py" in err


def test_unreadable_frame_mid_folder_warns_and_repeats_the_last_box(ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    seq = write_clip(tmp_path / "seq", frames, gt)
    broken = os.path.join(seq, "img", "00000007.jpg")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8 this is not a jpeg" * 10)
    code, out, err = run(capsys, seq, "--out", tmp_path / "r.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    assert broken in err and "warning" in err
    result = read_result(tmp_path / "r.txt")
    assert len(result) == CLIP_N and np.array_equal(result[6], result[5])
    assert f"({CLIP_N} frames with ground truth)" in out                       # still scored, over every frame


def test_undecodable_packet_mid_video_warns_and_keeps_one_box_per_frame(ckpt, clip, tmp_path, capsys):
    source = write_clip(tmp_path / "clip.mp4", clip[0])
    with av.open(source) as container:                                   # where the 6th packet's bytes are
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    pos, size = packets[5]
    data = bytearray((tmp_path / "clip.mp4").read_bytes())
    data[pos + 4:pos + size] = b"\xff" * (size - 4)                      # keep the length field, break the rest
    (tmp_path / "broken.mp4").write_bytes(bytes(data))
    code, out, err = run(capsys, tmp_path / "broken.mp4", "--box", "20,30,30,30", "--out", tmp_path / "r.txt",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    warning = re.search(rf"warning: {re.escape(str(tmp_path / 'broken.mp4'))}: frame (\d+) failed to decode", err)
    assert warning, err
    result, k = read_result(tmp_path / "r.txt"), int(warning.group(1))  # k: 1-based, as the lines of r.txt
    assert len(result) == CLIP_N and 2 <= k <= CLIP_N and np.array_equal(result[k - 1], result[k - 2])


def test_later_ground_truth_lines_that_are_nan_inf_or_zero_size_are_not_scored(ckpt, clip, tmp_path, capsys):
    frames, gt = clip
    lines = [",".join(f"{v:g}" for v in box) for box in gt]
    lines[3], lines[5], lines[8] = "nan,nan,nan,nan", "inf,1,2,3", "40,40,10,0"      # LaSOT's absent target, ...
    seq = write_clip(tmp_path / "seq", frames, "\n".join(lines) + "\n")
    code, out, err = run(capsys, seq, "--out", tmp_path / "r.txt", "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result, scored = read_result(tmp_path / "r.txt"), [i for i in range(CLIP_N) if i not in (3, 5, 8)]
    assert len(result) == CLIP_N and f"({CLIP_N - 3} frames with ground truth)" in out
    s = track.evaluate(result[scored], gt[scored])
    assert np.allclose(printed_scores(out), [100 * s[k] for k in track.SCORES], atol=0.05 + 1e-9)


def test_a_video_stream_broken_mid_way_ends_the_video_there(ckpt, clip, tmp_path, capsys):
    # an MPEG-TS stream (no index at the end, unlike mp4, whose cut file cannot be opened at all) cut at 70%
    data = open(write_clip(tmp_path / "clip.ts", clip[0]), "rb").read()
    (tmp_path / "cut.ts").write_bytes(data[:int(0.7 * len(data))])
    code, out, err = run(capsys, tmp_path / "cut.ts", "--box", "20,30,30,30", "--out", tmp_path / "r.txt",
                         "--ckpt", ckpt, "--device", "cpu")
    assert code == 0, err
    result = read_result(tmp_path / "r.txt")
    assert 2 <= len(result) < CLIP_N and np.array_equal(result[0], [20, 30, 30, 30])
    assert all(line.startswith("warning: ") for line in err.splitlines()), err


def test_frames_that_change_size_keep_the_box_meaningful_in_track_and_train(ckpt, tmp_path, capsys):
    small, large = make_clip(3, (48, 36), side=12, start=(10, 8))[0], make_clip(3, (96, 72), side=24, start=(20, 16))[0]
    folder = write_clip(tmp_path / "seq", small + large, sub="")
    code, out, err = run(capsys, folder, "--box", "10,8,16,12", "--out", tmp_path / "r.txt", "--ckpt", ckpt)
    assert code == 0, err
    assert err == f"warning: {folder}: frame 4 is 96x72, earlier frames were 48x36; the box is rescaled to the " \
                  f"new size\n"
    result = read_result(tmp_path / "r.txt")
    assert len(result) == 6 and (result[:3, :2] + result[:3, 2:] <= [48, 36]).all()
    assert (result[3:, :2] >= 0).all() and (result[3:, :2] + result[3:, 2:] <= [96, 72]).all()
    tracker = pntrack.Tracker(pntrack.PNTrack(FAST_CFG), device="cpu")
    tracker.init(small[0], (10, 8, 16, 12))
    tracker.rescale(2, 2)                                   # the box moves with the frame: (cx, cy, w, h) x 2
    assert np.allclose(tracker.box, [36, 28, 32, 24])
    # training: later frames are resized to the first frame's size (the first box is in its coordinates)
    open(os.path.join(folder, "groundtruth.txt"), "w").write("10,8,16,12\n")
    (seq,), problems = train.find_sequences(folder, tiny())
    assert [seq.frame(i).size for i in range(6)] == [(48, 36)] * 6 and problems == []
    err = capsys.readouterr().err                           # warned once, naming the first frame that differs
    assert err == f"warning: {os.path.join(folder, '00000004.jpg')}: frame 4 is 96x72, frame 1 is 48x36; " \
                  f"such frames are resized to 48x36\n"
