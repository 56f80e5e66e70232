"""extras/split.py: the real-data split (README "Real video"), chosen once, by name, before any sequence was
scored. `python train.py --data ../shared/data --make-split DIR` links the sequences into DIR/train, DIR/val and
DIR/test (`make_split`); `real_split` is the rule itself.
"""
import os


TEST_SEQUENCES = ("otb_Crossing", "otb_Girl", "vot15_bag")      # ../shared/data/sequences: never trained on


def real_split(root):
    """ROOT = ../shared/data -> {"train": [...], "val": [...], "test": [...]} sequence folders. Rule: in each of
    ROOT/pool and ROOT/pool2, sort the names; every 4th (indices 3, 7, 11, ...) is validation, the rest trains;
    of ROOT/sequences the three TEST_SEQUENCES are the test set and the other five train; ROOT/pool3 (issue 24:
    new objects) trains, all of it, so validation and test stay exactly as they were."""
    def folders(sub):
        d = os.path.join(root, sub)
        return sorted(os.path.join(d, n) for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))) if os.path.isdir(d) else []
    pool, pool2, pool3, dev = folders("pool"), folders("pool2"), folders("pool3"), folders("sequences")
    if not pool and not pool2 and not pool3 and not dev:
        raise ValueError(f"--make-split: {root} has no pool/, pool2/, pool3/ or sequences/ folders of sequences")
    val = pool[3::4] + pool2[3::4]
    test = [f for f in dev if os.path.basename(f) in TEST_SEQUENCES]
    train = [f for f in pool + pool2 if f not in val] + [f for f in dev if f not in test] + pool3
    return {"train": train, "val": val, "test": test}


def make_split(root, out):
    """Symlink the split's folders into OUT/train, OUT/val, OUT/test (the data itself is never copied)."""
    for part, folders in real_split(root).items():
        os.makedirs(os.path.join(out, part), exist_ok=True)
        for f in folders:
            link = os.path.join(out, part, os.path.basename(f))
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(f), link)
        print(f"{os.path.join(out, part)}: {len(folders)} sequences")
