"""extras/mae.py: MAE pre-training of the backbone (He et al. CVPR 2022), an optional stage before tracking:

    python train.py --mae --stem patch16 --data DIR --out OUT     # writes OUT/mae.pt
    python train.py --stem patch16 --data DIR --pretrained OUT/mae.pt

The backbone learns to fill in hidden patches of video frames before any tracking (`MaskedAutoencoder`, trained
by `pretrain_mae`). OUT/mae.pt is in MAE's own format: --pretrained loads it (pntrack.load_pretrained) exactly
like a downloaded MAE checkpoint.
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import pntrack
from extras import synth


class MaskedAutoencoder(nn.Module):
    """MAE pre-training of the backbone (He et al. CVPR 2022). The papers start from MAE (SSTrack) or DropMAE
    (PNTrack) ViT-B weights; `tiny` has no such weights, so `train.py --mae` makes its own from video frames.

    On a search-size image: 75% of its patches are hidden, the tracker's ViT (patch_embed, blocks, norm)
    encodes the rest, and a small decoder rebuilds the hidden patches' pixels, each patch normalised by its own
    mean and std (MAE's norm_pix_loss). Parameter names are timm/MAE's, so `load_pretrained` reads the
    `{"model": state_dict()}` that `pretrain_mae` below writes exactly like a downloaded MAE checkpoint.
    """
    def __init__(self, cfg, mask_ratio=0.75, dec_dim=128, dec_depth=2, dec_heads=4):
        super().__init__()
        D, P = cfg.embed_dim, cfg.patch_size
        self.P, self.mask_ratio, self.n = P, mask_ratio, (cfg.search_size // P) ** 2
        self.patch_embed = pntrack.PatchEmbed(P, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n, D))           # the grid load_pretrained resizes
        self.blocks = nn.ModuleList(pntrack.Block(D, cfg.n_heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, dec_dim)                          # MAE's decoder, smaller: 2 x 128
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.n, dec_dim))
        self.decoder_blocks = nn.ModuleList(pntrack.Block(dec_dim, dec_heads) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, P * P * 3)
        self.apply(pntrack.init_weights)
        for p in (self.pos_embed, self.mask_token, self.decoder_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def patchify(self, images):
        """(B, 3, S, S) -> (B, N, P*P*3), patches in the token order of PatchEmbed."""
        B, C, S, _ = images.shape
        P, G = self.P, S // self.P
        return images.reshape(B, C, G, P, G, P).permute(0, 2, 4, 3, 5, 1).reshape(B, G * G, P * P * C)

    def forward(self, images):
        """images (B, 3, Sx, Sx), normalised -> (loss, predicted patches (B, N, P*P*3), mask (B, N), 1 = hidden)."""
        x = self.patch_embed(images) + self.pos_embed                       # (B, N, D)
        B, N, D = x.shape
        keep = torch.rand(B, N, device=x.device).argsort(1)[:, :int(N * (1 - self.mask_ratio))]   # (B, n) shown
        x = x.gather(1, keep[..., None].expand(-1, -1, D))                  # (B, n, D)
        for blk in self.blocks:
            x, _ = blk(x)
        x = self.decoder_embed(self.norm(x))                                # (B, n, Dd)
        full = self.mask_token.expand(B, N, -1).scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), x)
        full = full + self.decoder_pos_embed                                # (B, N, Dd): mask tokens + shown
        for blk in self.decoder_blocks:
            full, _ = blk(full)
        pred = self.decoder_pred(self.decoder_norm(full))                   # (B, N, P*P*3)
        target = self.patchify(images)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        mask = torch.ones(B, N, device=x.device).scatter(1, keep, 0.0)
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()  # on the hidden patches only
        return loss, pred, mask


# -----------------------------------------------------------------------------
# The --mae stage: random crops of video frames, at about the scales of the tracker's search crops

def mae_frames(sequences, max_frames=3000, side=360):
    """Frames to cut MAE crops from: evenly spaced frames of every sequence (at most max_frames in all), each
    shrunk so its longer side is at most `side` px, kept in memory (decoded once)."""
    total = sum(len(s) for s in sequences)
    stride = max(1, math.ceil(total / max_frames))
    frames = []
    for seq in sequences:
        for i in range(0, len(seq), stride):
            image = seq.frame(i).copy()
            image.thumbnail((side, side), Image.BILINEAR)
            frames.append(image)
    return frames


def mae_crop(image, rng, size):
    """A random square crop of an image, side 15-70% of sqrt(W*H), resized to size x size, flipped half the
    time: objects at about the scales the tracker's search crops show them -> (3, size, size) uint8 tensor."""
    W, H = image.size
    side = math.sqrt(W * H) * rng.uniform(0.15, 0.7)
    box = (rng.uniform(0, W), rng.uniform(0, H), side, side)
    crop, _ = pntrack.crop_image(image, box, 1.0, size)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)


def pretrain_mae(args, cfg, sequences, log, load_resume, duration):
    """The `--mae` stage: MAE on crops of --data's frames (or of generated videos without --data); AdamW with
    MAE's betas and weight decay, 5% warm-up, then a cosine decay; OUT/mae.pt after each epoch, OUT/mae_last.pt
    (weights, optimizer, epoch) for --resume. Returns the exit code.

    log, load_resume, duration: train.py's progress log (its lines also go to OUT/train.log), --resume loader and
    time format, handed in because extras never import the scripts."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise ValueError("--mae runs in one process (start it with python, not torchrun)")
    if cfg.stem != "patch16":
        raise ValueError(f"--mae pre-trains the patch16 stem's ViT; stem {cfg.stem} starts from ImageNet weights "
                         f"(add --stem patch16)")
    device = pntrack.pick_device(args.device)
    torch.manual_seed(args.seed)
    epochs = args.epochs or 20
    per_epoch, batch = args.samples_per_epoch or 4096, args.batch_size or 64
    steps = per_epoch // batch
    model = MaskedAutoencoder(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or 1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    base_lr = optimizer.param_groups[0]["lr"]
    out_path, last_path = os.path.join(args.out, "mae.pt"), os.path.join(args.out, "mae_last.pt")
    start_epoch = 1
    if args.resume:
        state = load_resume(last_path, model, optimizer, device, rng=False)
        start_epoch = state["epoch"] + 1
        log(f"resuming MAE from {last_path}: epoch {state['epoch']} done")
    if isinstance(sequences, synth.GeneratedSequences):
        frames = None                                    # generated: a fresh clip and frame for every crop
    else:
        frames = mae_frames(sequences)
    log(f"MAE pre-training of the {cfg.name} backbone: {epochs} epochs x {steps} steps x {batch} crops of "
        f"{cfg.search_size} px, 75% of patches hidden; frames: "
        f"{len(frames) if frames else 'generated'}; device {device}")
    start, total = time.time(), (epochs - start_epoch + 1) * steps
    warm = max(1, int(0.05 * epochs * steps))                            # warm-up steps
    for epoch in range(start_epoch, epochs + 1):
        model.train()
        for step in range(1, steps + 1):
            rng = np.random.default_rng([args.seed, epoch, step])       # a resumed run sees the same crops
            done = (epoch - 1) * steps + step
            lr = base_lr * (done / warm if done < warm else 0.5 * (1 + math.cos(math.pi * (done - warm) / (epochs * steps - warm))))
            for g in optimizer.param_groups:
                g["lr"] = lr
            if frames is None:
                clips = [sequences[int(rng.integers(len(sequences)))] for _ in range(batch)]
                images = [c.frame(int(rng.integers(len(c)))) for c in clips]
            else:
                images = [frames[int(rng.integers(len(frames)))] for _ in range(batch)]
            x = pntrack.normalize(torch.stack([mae_crop(im, rng, cfg.search_size) for im in images]).to(device))
            with pntrack.autocast(device):
                loss, _, _ = model(x)
            if not torch.isfinite(loss):
                log(f"error: MAE loss is not finite at epoch {epoch} step {step}; stopping ({out_path} is the "
                    f"last good epoch's)")
                return 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % args.log_every == 0 or step == steps:
                elapsed = time.time() - start
                n = (epoch - start_epoch) * steps + step
                log(f"mae epoch {epoch}/{epochs} step {step}/{steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                    f"{n * batch / elapsed:.1f} crops/s | ETA {duration(elapsed / n * (total - n))}")
        pntrack.atomic_save({"model": model.state_dict()}, out_path)
        pntrack.atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}, last_path)
        if args.max_minutes and time.time() - start > args.max_minutes * 60 and epoch < epochs:
            log(f"--max-minutes {args.max_minutes} reached after MAE epoch {epoch}: {out_path} saved; "
                f"--resume continues with epoch {epoch + 1}")
            return 0
    log(f"MAE done in {duration(time.time() - start)}: {out_path} (load it with --pretrained {out_path})")
    return 0
