"""Every command in the README works as written (issue 25): each command line of the README's ```bash blocks is in
COMMANDS below, either RUN (it fits CI: seconds to a minute on a 2-core CPU, run here as written) or SKIP with the
reason. A README command missing from COMMANDS fails ("new README command: classify it"), and so does an entry of
COMMANDS that is no longer in the README, so the table cannot go stale. The README is read at test time.

A RUN command runs in a temporary folder that links the scripts (train.py, track.py, pntrack.py, kernels.py,
extras/) and the shipped assets, so `out/` and every file a command writes land there, never in the repository.
Files a command names that a clone does not have (`video.mp4`, `clip.gif`, `path/to/otb/Girl`, ...) are small
generated stand-ins with exactly those names. `python` and `pytest` are this interpreter's; OMP_NUM_THREADS=1;
DISPLAY is removed, so a command that would open a window fails instead of waiting for a user.

Self-contained: the repository root is one level above this file; only pytest's own fixtures are used.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import write_clip          # the one clip writer (mp4, GIF, sequence folders)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
HAS_SHARED = os.path.isdir(os.path.join(ROOT, "..", "shared", "data"))    # the sibling checkout of real data
SCRIPTS = ("train.py", "track.py", "pntrack.py", "kernels.py", "extras")  # what the temporary folder links
TIMEOUT = 300                                                              # seconds, per command


# -----------------------------------------------------------------------------
# The README's commands

def strip_comment(line):
    """`cmd --flag x   # a comment` -> `cmd --flag x`: a # that starts a word, outside quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text=None):
    """The command lines of the README's ```bash blocks, in order, each once: `\\` continuations joined, comments
    stripped, `&&` chains split, whitespace collapsed; `pip install` lines (the installs) left out."""
    if text is None:
        with open(README, encoding="utf-8") as f:
            text = f.read()
    commands = []
    for block in re.findall(r"^```bash[ \t]*\n(.*?)^```", text, re.S | re.M):
        pending = ""
        for line in block.splitlines():
            line = strip_comment(line)
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            for part in line.split("&&"):
                cmd = re.sub(r"\s+", " ", part).strip()
                if cmd and not re.match(r"(python -m )?pip install\b", cmd) and cmd not in commands:
                    commands.append(cmd)
        assert not pending.strip(), f"README: a ```bash block ends in a `\\` continuation: {pending!r}"
    return commands


RUN = "RUN"


def skip(reason):
    return ("SKIP", reason)


DISPLAY = "needs a display; covered by the window tests"
NO_SHARED = "needs ../shared/data (the sibling checkout of real sequences), absent here"
SHARED = RUN if HAS_SHARED else skip(NO_SHARED)

# Every command of the README's ```bash blocks, as readme_commands() spells it: RUN here, or SKIP and why.
COMMANDS = {
    # Quick start
    "python track.py": RUN,                       # the demo: out/demo.txt, out/demo.gif
    # placeholder box: as written it must stop with exit 2 and one line naming --box; with numbers, it tracks
    "python track.py video.mp4 --box x,y,w,h --out boxes.txt": RUN,
    "python train.py": skip("the full tiny training run: ~8 minutes on a 2-core CPU (README); the training "
                            "tests run it shortened"),
    "pytest -q": skip("the whole suite (~2 minutes), which holds this module; CI runs it (`bash .ci/run`)"),
    # Read the code
    "python train.py --explain assets --ckpt out/p3f1/pntrack.pt --log out/p3f1/train.log": RUN,  # stand-in run
    "python track.py /tmp/split/test --plot assets/success_test.png": SHARED,   # after --make-split /tmp/split
    # Train
    "python train.py --data ~/data/GOT-10k/train --val ~/data/OTB100 --config pntrack-256 --pretrained dropmae.pth":
        skip("needs GOT-10k and OTB100 under ~/data and a downloaded DropMAE checkpoint; pntrack-256 trains on GPUs"),
    "torchrun --nproc_per_node=4 train.py --data ... --config pntrack-256 --pretrained dropmae.pth":
        skip("needs 4 GPUs, a dataset (`...`) and a downloaded DropMAE checkpoint; DDP is covered by the "
             "training tests (two gloo processes on a CPU)"),
    "python train.py --resume": RUN,              # after a stand-in run (see test: what it resumes)
    "python train.py --help": RUN,                # and every train.py flag the README names is in the help
    "python train.py --data ../shared/data --make-split /tmp/split": SHARED,
    "OMP_NUM_THREADS=1 python train.py --data /tmp/split/train --val /tmp/split/val --eval-clips 0 --seed 1 "
    "--first-template --out out/p3f1": skip("the release training run: under 1 CPU-hour (README), and it needs "
                                            "../shared/data"),
    "python train.py --out out/p3f1 --export assets/pntrack-tiny.pt": RUN,      # from a stand-in out/p3f1
    # Track
    "python track.py video.mp4 --box 120,80,60,90 --out boxes.txt --save tracked.mp4": RUN,
    "python track.py clip.mp4": RUN,             # the sidecar clip.txt gives the box
    "python track.py path/to/otb/Girl": RUN,
    "python track.py path/to/OTB100 --out results/ --plot curves.png": RUN,
    "python track.py clip.gif --box 10,10,40,40 --config tiny --frames 50": RUN,
    # Your own video
    "python track.py my_video.mp4 --show --out boxes.txt": skip(DISPLAY + " (no box: the picker, then --show)"),
    "python track.py my_video.mp4 --box 412,230,96,120 --show --out boxes.txt": skip(DISPLAY + " (--show)"),
    "python track.py path/to/otb/Girl --select": skip(DISPLAY + " (--select: the picker)"),
    # Testing
    'pytest -m "not slow and not gui"': skip("a subset of the suite, which holds this module; CI runs the whole "
                                             "suite"),
    "bash .ci/run": skip("CI itself: installs system and Python packages into a fresh .venv, then the whole suite"),
    "PNTRACK_SCREENSHOTS=assets pytest -q -k window": skip(DISPLAY + " (Xvfb + xdotool), and it rewrites the "
                                                          "README's screenshots in assets/"),
}


def test_every_readme_command_is_classified():
    """The table and the README agree both ways: a new README command, or a stale entry, fails here."""
    commands = readme_commands()
    assert commands, "no command found in the README's ```bash blocks"
    width = max(map(len, commands))
    print("\nREADME commands:")
    for cmd in commands:
        kind = COMMANDS.get(cmd)
        print(f"  {cmd:<{width}}  {'UNCLASSIFIED' if kind is None else kind if kind == RUN else 'SKIP: ' + kind[1]}")
    new = [c for c in commands if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in commands]
    problems = [f"new README command: classify it in COMMANDS (tests/test_readme_commands.py): {c}" for c in new]
    problems += [f"COMMANDS lists a command that is no longer in the README: remove it: {c}" for c in stale]
    assert not problems, "\n".join(problems)


def test_extraction():
    """readme_commands on a made-up README: continuations, comments, && chains, quotes, installs, other fences."""
    text = ("```bash\npip install -r requirements.txt\npython a.py --x 1   # a comment\n"
            "A=1 python b.py --y 2 \\\n    --z 3    # continued\ncp x y && python c.py 'q # not a comment'\n"
            "python a.py --x 1\n```\n\n```python\nprint('not a command')\n```\n")
    assert readme_commands(text) == ["python a.py --x 1", "A=1 python b.py --y 2 --z 3", "cp x y",
                                     "python c.py 'q # not a comment'"]


# -----------------------------------------------------------------------------
# Running a command as written

def make_workdir(path, exclude=()):
    """PATH/ with links to the scripts and to the shipped assets, minus `exclude` (files the command writes:
    a link there would let it overwrite the repository's file) -> PATH."""
    os.makedirs(os.path.join(path, "assets"))
    for name in SCRIPTS:
        os.symlink(os.path.join(ROOT, name), os.path.join(path, name))
    for name in os.listdir(os.path.join(ROOT, "assets")):
        if name not in exclude:
            os.symlink(os.path.join(ROOT, "assets", name), os.path.join(path, "assets", name))
    return str(path)


def run_command(cmd, cwd, check=True):
    """Run a README command as written in `cwd` -> CompletedProcess (text). Leading VAR=value words set the
    environment, as in a shell; `python` / `pytest` are this interpreter's."""
    argv, env = shlex.split(cmd), dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DISPLAY", None)                   # no window can open and wait for a user
    while argv and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "pytest":
        argv[:1] = [sys.executable, "-m", "pytest"]
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert r.returncode == 0, f"`{cmd}` exited {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r


def read_boxes(path):
    """A result file -> (N, 4) array; each line must be exactly `x,y,w,h` (four numbers)."""
    with open(path) as f:
        lines = f.read().splitlines()
    number = r"-?\d+(\.\d+)?"
    for i, line in enumerate(lines):
        assert re.fullmatch(",".join([number] * 4), line), f"{path} line {i + 1} is not x,y,w,h: {line!r}"
    return np.array([[float(v) for v in line.split(",")] for line in lines])


def n_frames(path):
    """Frames in a .gif (Pillow) or a video (PyAV)."""
    if path.endswith(".gif"):
        with Image.open(path) as gif:
            return gif.n_frames
    import av
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def assert_image(path):
    assert os.path.isfile(path), f"{path} was not written"
    with Image.open(path) as im:
        im.verify()


# stand-ins for the user's files: a textured square moving (by default) 3 px right and 2 px down per frame on a
# textured background; the box of frame i is (x0 + 3i, y0 + 2i, w, h). Keep it inside the frame: Pillow merges
# equal frames of a GIF.

def clip(size, box, n, step=(3, 2)):
    (W, H), (x0, y0, w, h) = size, box
    rng = np.random.default_rng(0)
    background = np.repeat(np.repeat(rng.integers(0, 128, (H // 8 + 1, W // 8 + 1, 3)), 8, 0), 8, 1)[:H, :W]
    target = np.repeat(np.repeat(rng.integers(128, 256, (h // 4 + 1, w // 4 + 1, 3)), 4, 0), 4, 1)[:h, :w]
    frames, boxes = [], []
    for i in range(n):
        x, y = x0 + step[0] * i, y0 + step[1] * i
        frame = background.copy()
        frame[y:y + h, x:x + w] = target[:max(0, min(h, H - y)), :max(0, min(w, W - x))]
        frames.append(frame.astype(np.uint8))
        boxes.append([x, y, w, h])
    return frames, np.array(boxes, float)


def text_box(text):
    return [float(v) for v in text.split(",")]


# -----------------------------------------------------------------------------
# The RUN commands: each case gets the command and a fresh temporary folder, makes what the command reads, runs
# it as written, checks what the README says it writes

CASES = {}


def case(cmd):
    def register(f):
        CASES[cmd] = f
        return f
    return register


@case("python track.py")
def demo(cmd, tmp, standin):
    work = make_workdir(tmp)
    r = run_command(cmd, work)
    boxes = read_boxes(os.path.join(work, "out", "demo.txt"))
    with open(os.path.join(ROOT, "assets", "bunny.txt")) as f:
        first = text_box(f.readline())
    assert np.allclose(boxes[0], first), "the result file does not start with the given box"
    assert n_frames(os.path.join(work, "assets", "bunny.mp4")) == len(boxes) == n_frames(os.path.join(work, "out", "demo.gif"))
    assert "speed:" in r.stdout


@case("python track.py video.mp4 --box x,y,w,h --out boxes.txt")
def placeholder_box(cmd, tmp, standin):
    work = make_workdir(tmp)
    frames, gt = clip((320, 240), (120, 80, 60, 90), 10)
    write_clip(os.path.join(work, "video.mp4"), frames)
    # as written: x,y,w,h is not a box; bad input ends with one line naming the argument, and exit code 2
    r = run_command(cmd, work, check=False)
    assert r.returncode == 2 and "--box" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # the user's numbers in its place
    run_command(cmd.replace("x,y,w,h", "120,80,60,90"), work)
    boxes = read_boxes(os.path.join(work, "boxes.txt"))
    assert len(boxes) == len(frames) and np.allclose(boxes[0], gt[0])


@case("python track.py video.mp4 --box 120,80,60,90 --out boxes.txt --save tracked.mp4")
def video(cmd, tmp, standin):
    work = make_workdir(tmp)
    frames, gt = clip((320, 240), (120, 80, 60, 90), 10)
    write_clip(os.path.join(work, "video.mp4"), frames)
    run_command(cmd, work)
    boxes = read_boxes(os.path.join(work, "boxes.txt"))
    assert len(boxes) == len(frames) and np.allclose(boxes[0], [120, 80, 60, 90])
    assert n_frames(os.path.join(work, "tracked.mp4")) == len(frames)


@case("python track.py clip.mp4")
def sidecar(cmd, tmp, standin):
    work = make_workdir(tmp)
    frames, gt = clip((96, 64), (20, 16, 20, 16), 8)
    write_clip(os.path.join(work, "clip.mp4"), frames)
    with open(os.path.join(work, "clip.txt"), "w") as f:       # the sidecar: its first line is the first box
        f.write("20,16,20,16\n")
    r = run_command(cmd, work)
    assert f"{len(frames)} frames)" in r.stdout, r.stdout


@case("python track.py path/to/otb/Girl")
def sequence(cmd, tmp, standin):
    work = make_workdir(tmp)
    frames, gt = clip((96, 64), (20, 16, 20, 16), 8)
    write_clip(os.path.join(work, "path", "to", "otb", "Girl"), frames, gt)
    r = run_command(cmd, work)
    assert re.search(r"^Girl: AUC [\d.]+ .*\(8 frames with ground truth\)", r.stdout, re.M), r.stdout


@case("python track.py path/to/OTB100 --out results/ --plot curves.png")
def dataset(cmd, tmp, standin):
    work = make_workdir(tmp)
    for name, box in (("Boy", (10, 8, 20, 16)), ("Girl", (30, 20, 16, 20))):
        frames, gt = clip((96, 64), box, 6)
        write_clip(os.path.join(work, "path", "to", "OTB100", name), frames, gt)
    r = run_command(cmd, work)
    for name, box in (("Boy", (10, 8, 20, 16)), ("Girl", (30, 20, 16, 20))):
        boxes = read_boxes(os.path.join(work, "results", name + ".txt"))
        assert len(boxes) == 6 and np.allclose(boxes[0], box)
        assert re.search(rf"^{name} +6 ", r.stdout, re.M), r.stdout          # its row of the table
    assert re.search(r"^mean \(2 sequences\)", r.stdout, re.M), r.stdout
    assert_image(os.path.join(work, "curves.png"))


@case("python track.py clip.gif --box 10,10,40,40 --config tiny --frames 50")
def smoke(cmd, tmp, standin):
    work = make_workdir(tmp)
    frames, gt = clip((128, 64), (10, 10, 40, 40), 60, step=(1, 0))
    write_clip(os.path.join(work, "clip.gif"), frames)
    assert n_frames(os.path.join(work, "clip.gif")) == 60
    r = run_command(cmd, work)
    assert "tiny, 50 frames)" in r.stdout, r.stdout                          # --frames 50 of the 60


@case("python train.py --help")
def train_help(cmd, tmp, standin):
    r = run_command(cmd, make_workdir(tmp))
    flags = readme_flags()
    missing = sorted(f for f in flags["train.py"] if f not in help_flags(r.stdout))
    assert not missing, f"the README names train.py flags its --help does not have: {missing}"


@case("python train.py --resume")
def resume(cmd, tmp, standin):
    """What it resumes: a stand-in run (the preset's 13 epochs of one 2-sample step each, no evaluation) whose
    epochs are all done and whose final evaluation is not; `--resume` loads out/last.pt and evaluates on the 16
    held-out clips (~15 s). A resume mid-run, bit for bit, is the training tests' job (a full epoch of the preset
    here would take minutes)."""
    work = make_workdir(tmp)
    shutil.copytree(standin, os.path.join(work, "out"))
    r = run_command(cmd, work)
    assert "resuming from out/last.pt" in r.stdout and "success AUC" in r.stdout, r.stdout
    with open(os.path.join(work, "out", "train.log")) as f:
        assert "resuming from out/last.pt" in f.read()


@case("python train.py --out out/p3f1 --export assets/pntrack-tiny.pt")
def export(cmd, tmp, standin):
    work = make_workdir(tmp, exclude={"pntrack-tiny.pt"})
    shutil.copytree(standin, os.path.join(work, "out", "p3f1"))
    run_command(cmd, work)
    import torch
    ckpt = torch.load(os.path.join(work, "assets", "pntrack-tiny.pt"), map_location="cpu", weights_only=True)
    tensors = [v for v in ckpt["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert tensors and all(v.dtype == torch.float16 for v in tensors), "--export must write fp16 weights"


@case("python train.py --explain assets --ckpt out/p3f1/pntrack.pt --log out/p3f1/train.log")
def explain(cmd, tmp, standin):
    figures = {n for n in os.listdir(os.path.join(ROOT, "assets")) if n.endswith((".png", ".gif"))}
    work = make_workdir(tmp, exclude=figures)                   # it draws into assets/: no links to the figures
    shutil.copytree(standin, os.path.join(work, "out", "p3f1"))
    r = run_command(cmd, work)
    wrote = re.findall(r"^wrote (assets/\S+)", r.stdout, re.M)
    assert len(wrote) == 5, f"the README says 5 figures; wrote {wrote}"
    for path in wrote:
        assert_image(os.path.join(work, path))


@case("python train.py --data ../shared/data --make-split /tmp/split")
def make_split(cmd, tmp, standin):
    # from the repository: ../shared/data must be the real sibling (the links hold its absolute paths and
    # outlive this test); --make-split writes only /tmp/split, adding missing links, never removing one
    run_command(cmd, ROOT)
    for part in ("train", "val", "test"):
        folder = os.path.join("/tmp/split", part)
        names = os.listdir(folder)
        assert names and all(os.path.isdir(os.path.join(folder, n)) for n in names), f"{folder}: {names}"


@case("python track.py /tmp/split/test --plot assets/success_test.png")
def split_test(cmd, tmp, standin):
    if not os.path.isdir("/tmp/split/test"):            # the README's split, made first (Train)
        run_command("python train.py --data ../shared/data --make-split /tmp/split", ROOT)
    work = make_workdir(tmp, exclude={"success_test.png"})
    r = run_command(cmd, work)
    assert re.search(r"^mean \(\d+ sequences\)", r.stdout, re.M), r.stdout
    assert_image(os.path.join(work, "assets", "success_test.png"))


def test_every_run_command_has_a_case():
    run = {c for c, k in COMMANDS.items() if k == RUN}
    assert run <= set(CASES) <= set(COMMANDS), (sorted(run - set(CASES)), sorted(set(CASES) - set(COMMANDS)))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A short training run's out/ (pntrack.pt, last.pt, train.log): the preset's epochs, one 2-sample step each,
    no evaluation (~8 s). Made once, on first use; each case copies it."""
    work = make_workdir(tmp_path_factory.mktemp("standin") / "work")
    run_command("python train.py --samples-per-epoch 2 --batch-size 2 --eval-clips 0", work)
    return os.path.join(work, "out")


def repo_assets():
    folder = os.path.join(ROOT, "assets")
    return {n: (os.stat(os.path.join(folder, n)).st_size, os.stat(os.path.join(folder, n)).st_mtime_ns)
            for n in os.listdir(folder)}


def command_params():
    params = []
    for cmd in readme_commands():
        marks = [pytest.mark.slow] if COMMANDS.get(cmd) == RUN else []      # each starts python + torch: > 2 s
        params.append(pytest.param(cmd, marks=marks, id=cmd))
    return params


@pytest.mark.parametrize("cmd", command_params())
def test_readme_command(cmd, tmp_path, request):
    kind = COMMANDS.get(cmd)
    if kind is None:
        pytest.fail(f"new README command: classify it in COMMANDS (tests/test_readme_commands.py): {cmd}")
    if kind != RUN:
        pytest.skip(kind[1])
    before = repo_assets()
    f = CASES[cmd]
    f(cmd, str(tmp_path), request.getfixturevalue("standin") if f in (resume, export, explain) else None)
    assert repo_assets() == before, "a command changed the repository's assets/"


# -----------------------------------------------------------------------------
# The flags the README names exist

def readme_flags():
    """{"train.py": flags, "track.py": flags, "either": flags}: every --flag in the README's code (```bash blocks
    and `inline code`), by the script named in the same command or span; a flag named alone goes to "either"."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    spans = readme_commands(text)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans += re.findall(r"`([^`]+)`", prose)
    flags = {"train.py": set(), "track.py": set(), "either": set()}
    for span in spans:
        if span.startswith(("torchrun", "pytest", "bash")) and "train.py" not in span:
            continue
        span = span.split("train.py", 1)[-1] if span.startswith("torchrun") else span     # torchrun's own flags
        found = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span))
        script = "train.py" if "train.py" in span else "track.py" if "track.py" in span else "either"
        flags[script] |= found
    return flags


def help_flags(text):
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


@pytest.mark.slow
def test_readme_flags_are_in_the_help():
    """Every --flag of the README's code is in its script's --help (a flag named alone: in one of the two)."""
    flags = readme_flags()
    assert flags["train.py"] and flags["track.py"], flags                         # the extraction works
    helps = {s: help_flags(subprocess.run([sys.executable, os.path.join(ROOT, s), "--help"], capture_output=True,
                                          text=True, timeout=TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout)
             for s in ("train.py", "track.py")}
    missing = [f"{s} {f}" for s in ("train.py", "track.py") for f in sorted(flags[s] - helps[s])]
    missing += [f for f in sorted(flags["either"]) if f not in helps["train.py"] | helps["track.py"]]
    assert not missing, f"the README names flags no --help has: {missing}"

