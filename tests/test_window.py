"""The windows: the box picker and --show, driven on a virtual X display (README "Your own video"; mark `gui`),
and what the tools say where no window can open.

Each window test runs `python track.py` in a subprocess on an Xvfb display started here, finds its window by title
and drags and types in it with xdotool, as a user would; they skip where Xvfb, xdotool or tkinter are missing.
`PNTRACK_SCREENSHOTS=assets pytest -q -k window` also saves the README's screenshots, assets/picker.png and
assets/show.png, from these runs.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import extras.window
from conftest import CLIP_N, ROOT, make_clip, read_result, run, write_clip

SCREEN = (800, 600)                                    # small: a 1280x720 clip must be scaled down to fit
TRACK_PY = os.path.join(ROOT, "track.py")
PICKER_RED = (255, 0, 0)                               # the rectangle being dragged


def xdotool(display, *args, check=True):
    """Run xdotool on `display` -> CompletedProcess (stdout as text)."""
    return subprocess.run(["xdotool", *map(str, args)], env=dict(os.environ, DISPLAY=display),
                          capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture(scope="module")
def xdisplay():
    """":N", a virtual X display (Xvfb, SCREEN) on the first free N in 90..120; skips where none can start."""
    import importlib.util
    from PIL import features
    missing = [tool for tool in ("Xvfb", "xdotool") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} here (Debian: apt-get install xvfb xdotool)")
    if importlib.util.find_spec("tkinter") is None:
        pytest.skip("no tkinter in this Python (Debian: apt-get install python3-tk)")
    if not features.check("xcb"):
        pytest.skip("Pillow without XCB support: cannot grab the screen")
    for n in range(90, 121):
        if os.path.exists(f"/tmp/.X{n}-lock"):         # another X server has it
            continue
        server = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "%dx%dx24" % SCREEN, "-nolisten", "tcp"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while server.poll() is None and time.monotonic() < deadline:
            if xdotool(f":{n}", "getdisplaygeometry", check=False).returncode == 0:    # it accepts connections
                yield f":{n}"
                server.terminate()
                server.wait()
                return
            time.sleep(0.1)
        server.kill()
        server.wait()
    pytest.skip("Xvfb could not start a display on any of :90 to :120")


@pytest.fixture
def gui(xdisplay, tmp_path):
    """start(*argv): `python track.py ARGV --threads 1` running on the virtual display (in tmp_path, so
    out/pntrack.pt is not picked up); killed at the end if it still runs."""
    procs = []

    def start(*argv):
        env = dict(os.environ, DISPLAY=xdisplay, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, TRACK_PY, *map(str, argv), "--threads", "1"], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return procs[-1]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def find_window(display, title, proc, timeout=60):
    """The id of the shown window whose title starts with `title`, given the keyboard focus (Xvfb has no window
    manager to give it); fails at once if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = xdotool(display, "search", "--onlyvisible", "--name", "^" + title, check=False).stdout.split()
        if found:
            xdotool(display, "windowfocus", "--sync", found[0])
            return found[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"track.py exited ({proc.returncode}) before its window opened:\n{out}{err}")
        time.sleep(0.05)
    pytest.fail(f"no window {title!r} after {timeout} s")


def finish(proc, timeout=60):
    """(exit code, stdout, stderr) of a track.py run, once it has ended by itself."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def drag(display, win, x0, y0, x1, y1):
    xdotool(display, "mousemove", "--window", win, x0, y0, "mousedown", 1,
            "mousemove", "--window", win, x1, y1, "mouseup", 1)


def grab_window(display, win):
    """The window as it is on the screen (RGB)."""
    from PIL import ImageGrab
    geometry = dict(line.split("=") for line in xdotool(display, "getwindowgeometry", "--shell", win).stdout.split())
    x, y, w, h = (int(geometry[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
    return ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=display).convert("RGB")


def keep_screenshot(image, name):
    """A README screenshot: into $PNTRACK_SCREENSHOTS (e.g. assets) when set, as a small PNG (128 colours)."""
    if os.environ.get("PNTRACK_SCREENSHOTS"):
        image.quantize(128).save(os.path.join(os.environ["PNTRACK_SCREENSHOTS"], name), optimize=True)


def drawn_box(out):
    """The box the picker printed: `box: --box x,y,w,h ...` -> [x, y, w, h]."""
    return [int(v) for v in re.search(r"^box: --box (\d+),(\d+),(\d+),(\d+)\b", out, re.M).groups()]


# generated clips of seed 5: one the shipped weights follow (most 480x360 ones they lose within 20 frames), for show.png
SHOW_SEED = 5


@pytest.mark.gui
def test_window_picker_maps_the_dragged_box_to_frame_pixels_on_a_clip_larger_than_the_screen(gui, xdisplay,
                                                                                            tmp_path):
    frames, gt = make_clip(3, (1280, 720), generated=SHOW_SEED)
    proc = gui(write_clip(tmp_path / "wide.mp4", frames), "--config", "tiny", "--frames", 2, "--out", tmp_path / "r.txt")
    win = find_window(xdisplay, extras.window.PICK_TITLE, proc)
    scale = grab_window(xdisplay, win).width / 1280    # the window is as wide as the picture shown
    assert 0.3 < scale < 1                             # scaled down to fit the 800x600 screen
    first = [100, 60, 180, 140]                        # window px, x0 y0 x1 y1: a first drag, then the real one
    x, y, w, h = gt[0]
    second = [round(v * scale) for v in (x - 10, y - 10, x + w + 10, y + h + 10)]    # around the target
    drag(xdisplay, win, *first)
    drag(xdisplay, win, *second)
    shown = grab_window(xdisplay, win)                 # drawn as dragged; the new drag replaced the first
    x0, y0, x1, y1 = second
    assert all(shown.getpixel(p) == PICKER_RED for p in [((x0 + x1) // 2, y0), ((x0 + x1) // 2, y1),
                                                          (x0, (y0 + y1) // 2), (x1, (y0 + y1) // 2)])
    assert shown.getpixel(((first[0] + first[2]) // 2, first[1])) != PICKER_RED
    keep_screenshot(shown, "picker.png")
    xdotool(xdisplay, "key", "Return")
    code, out, err = finish(proc)
    assert code == 0, err
    expected = np.array([x0, y0, x1 - x0, y1 - y0]) / scale
    printed = drawn_box(out)
    assert np.abs(np.array(printed) - expected).max() <= 1 / scale + 1, (printed, expected)
    assert read_result(tmp_path / "r.txt")[0].tolist() == printed          # the box tracked is the one printed


@pytest.mark.gui
def test_window_picker_with_select_ignores_a_click_and_takes_the_drag_over_the_ground_truth(gui, xdisplay, clip,
                                                                                          tmp_path):
    frames, gt = clip
    seq = write_clip(tmp_path / "seq", frames, gt)     # ground truth starts at 20,30,30,30
    proc = gui(seq, "--select", "--config", "tiny", "--out", tmp_path / "r.txt")
    win = find_window(xdisplay, extras.window.PICK_TITLE, proc)
    xdotool(xdisplay, "mousemove", "--window", win, 40, 40, "click", 1, "key", "Return")
    time.sleep(1)
    assert proc.poll() is None                         # a click draws no box: Enter did nothing, it still waits
    drag(xdisplay, win, 90, 70, 50, 20)                # dragged up and left: the same box as 50,20 -> 90,70
    xdotool(xdisplay, "key", "space")
    code, out, err = finish(proc)
    assert code == 0, err
    assert drawn_box(out) == [50, 20, 40, 50]          # a clip smaller than the screen: shown 1:1
    result = read_result(tmp_path / "r.txt")
    assert result[0].tolist() == [50, 20, 40, 50] and len(result) == CLIP_N
    assert "AUC" in out                                # still scored against the ground truth


@pytest.mark.gui
def test_window_picker_esc_cancels_with_one_line_exit_2_and_nothing_written(gui, xdisplay, clip, tmp_path):
    video = write_clip(tmp_path / "clip.mp4", clip[0])  # no --box, no ground truth: the picker opens by itself
    proc = gui(video, "--config", "tiny", "--out", tmp_path / "r.txt")
    win = find_window(xdisplay, extras.window.PICK_TITLE, proc)
    drag(xdisplay, win, 20, 30, 50, 60)
    xdotool(xdisplay, "key", "Escape")
    code, out, err = finish(proc)
    assert code == 2 and err == f"error: {video}: no box drawn (Esc, or the window was closed); nothing tracked\n"
    assert not os.path.exists(tmp_path / "r.txt") and "network:" not in out


@pytest.mark.gui
def test_window_show_runs_to_the_end_by_itself(gui, xdisplay, tmp_path):
    frames = make_clip(20, (160, 120), side=30, start=(20, 30), step=(3, 2))[0]
    proc = gui(write_clip(tmp_path / "clip.gif", frames), "--box", "20,30,30,30", "--show", "--config", "tiny",
               "--out", tmp_path / "r.txt")
    find_window(xdisplay, extras.window.SHOW_TITLE, proc)      # up while the network loads and the clip is tracked
    code, out, err = finish(proc)                      # no key pressed: it ends after the last frame
    assert code == 0, err
    assert "stopped" not in out and "(20 boxes)" in out and len(read_result(tmp_path / "r.txt")) == 20


@pytest.mark.gui
def test_window_show_space_pauses_and_q_stops_with_the_frames_so_far_written(gui, xdisplay, tmp_path):
    n = 120
    frames, gt = make_clip(n, (480, 360), generated=SHOW_SEED)
    seq = write_clip(tmp_path / "seq", frames, gt)
    proc = gui(seq, "--show", "--out", tmp_path / "r.txt")         # the shipped weights: a real track to show
    win = find_window(xdisplay, extras.window.SHOW_TITLE, proc)

    def title():                                       # `pntrack: tracking: seq, frame 31/120 (paused)`
        name = xdotool(xdisplay, "getwindowname", win).stdout
        frame = re.search(rf"frame (\d+)/{n}", name)
        return int(frame.group(1)) if frame else 0, name.strip().endswith("(paused)")

    deadline = time.monotonic() + 60
    while title()[0] < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    xdotool(xdisplay, "key", "space")
    while not title()[1] and time.monotonic() < deadline:
        time.sleep(0.02)
    paused_at, paused = title()
    time.sleep(0.5)
    assert paused and title() == (paused_at, True)     # paused: no frame shown since
    shown = np.asarray(grab_window(xdisplay, win))
    for colour in ((255, 40, 40), (0, 220, 0)):        # the tracker's box and the ground truth are drawn
        assert (shown == colour).all(-1).sum() > 50, colour
    keep_screenshot(Image.fromarray(shown), "show.png")
    xdotool(xdisplay, "key", "q")
    code, out, err = finish(proc)
    assert code == 0, err
    assert f"stopped at frame {paused_at} " in out and f"({paused_at} boxes)" in out and paused_at < n
    assert len(read_result(tmp_path / "r.txt")) == paused_at
    assert re.search(r"^speed: .* FPS end to end .*, %d frames\)" % paused_at, out, re.M)


def test_without_a_display_picker_and_show_give_one_line_and_exit_2(clip, ckpt, tmp_path, capsys, monkeypatch):
    frames, gt = clip
    video, seq = write_clip(tmp_path / "clip.mp4", frames), write_clip(tmp_path / "seq", frames, gt)
    no_picker = "drawing the first box (--select) needs a display"
    for why in ("no DISPLAY", "no X server", "no tkinter"):
        if why == "no X server":
            monkeypatch.setenv("DISPLAY", ":1999")
        if why == "no tkinter":                        # `import tkinter` fails, as where Tk is not installed
            monkeypatch.setitem(sys.modules, "tkinter", None)
        for argv, expected in [([video], [f"error: {video}: ", no_picker, "--box x,y,w,h"]),
                               ([seq, "--select"], [f"error: {seq}: ", no_picker, "--box x,y,w,h"]),
                               ([video, "--box", "20,30,30,30", "--show"], ["error: --show: no display"])]:
            code, out, err = run(capsys, *argv, "--ckpt", ckpt, "--out", tmp_path / "r.txt")
            assert code == 2 and len(err.splitlines()) == 1, (why, argv, err)
            assert all(text in err for text in expected), (why, argv, err)
            assert "network:" not in out and not os.path.exists(tmp_path / "r.txt")    # stopped before tracking


def test_show_and_select_are_refused_for_a_dataset_root(ckpt, clip, tmp_path, capsys):
    write_clip(tmp_path / "root" / "seq", clip[0], clip[1])
    for flag in ("--show", "--select"):
        code, out, err = run(capsys, tmp_path / "root", flag, "--ckpt", ckpt)
        assert code == 2 and err == f"error: {flag}: not supported for a dataset root ({tmp_path / 'root'}); " \
                                    f"run on one sequence folder\n"
