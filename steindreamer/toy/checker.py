"""Ground-truth checks for images and depth maps of the toy world.

- colour: every non-white pixel votes for the nearest palette colour by chromaticity (rgb / sum,
  which white-light shading leaves unchanged); the majority wins.
- shape: a small CNN trained only on exact renders (`train_shape_classifier`), fed a colour-free
  input (the foreground mask and the brightness normalised within the object), so it judges
  geometry and shading, never the hue.
- depth: least-squares scale and shift of a predicted disparity onto the true one over the
  object, then AbsRel of the implied depth, and the Pearson correlation.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from steindreamer.toy.world import COLOURS, PALETTE, SHAPES, TOY_RESOLUTION, render_batch, sample_views

WHITE_DIST = 0.25  # a pixel farther than this from white (Euclidean, rgb in [0, 1]) is foreground
CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "builtin" / "checker" / "shape_classifier.safetensors"


def foreground(rgb: torch.Tensor) -> torch.Tensor:
    """[..., H, W, 3] in [0, 1] → bool [..., H, W]: pixels that are not (near) white."""
    return (1 - rgb).norm(dim=-1) > WHITE_DIST


def _chroma(rgb: torch.Tensor) -> torch.Tensor:
    return rgb / rgb.sum(-1, keepdim=True).clamp(min=1e-4)


def pixel_colours(rgb: torch.Tensor) -> torch.Tensor:
    """Index into COLOURS of the nearest palette chromaticity, per pixel ([..., H, W])."""
    pal = _chroma(torch.tensor([PALETTE[c] for c in COLOURS]))
    d = (_chroma(rgb)[..., None, :] - pal).norm(dim=-1)
    return d.argmin(-1)


def image_stats(rgb: torch.Tensor) -> dict[str, float]:
    """One image [H, W, 3]: the winning colour, its share of the votes, the foreground fraction and
    how white the background is (mean distance from white of the background pixels)."""
    fg = foreground(rgb)
    out = {"fg_fraction": fg.float().mean().item(),
           "bg_whiteness_error": (1 - rgb[~fg]).norm(dim=-1).mean().item() if (~fg).any() else float("nan")}
    if not fg.any():
        return {**out, "colour": None, "colour_share": 0.0}
    votes = torch.bincount(pixel_colours(rgb[fg]), minlength=len(COLOURS)).float()
    return {**out, "colour": COLOURS[int(votes.argmax())], "colour_share": (votes.max() / votes.sum()).item()}


# ------------------------------------------------------------------------------------ shape
def shape_input(rgb: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] → [B, 2, H, W]: foreground mask and brightness normalised within the object."""
    fg = foreground(rgb).float()
    lum = rgb.max(-1).values * fg  # max channel: the shading factor times the albedo's strongest channel
    top = lum.flatten(1).max(1).values.clamp(min=1e-3)[:, None, None]
    return torch.stack([fg, lum / top], 1)


class ShapeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        c = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.GroupNorm(4, o), torch.nn.SiLU())  # noqa: E731
        self.body = torch.nn.Sequential(c(2, 16), c(16, 16), torch.nn.MaxPool2d(2), c(16, 32), c(32, 32), torch.nn.MaxPool2d(2),
                                        c(32, 64), c(64, 64), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(64, len(SHAPES)))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """rgb [B, H, W, 3] in [0, 1] → logits [B, 6] over SHAPES."""
        x = shape_input(rgb)
        if x.shape[-1] != TOY_RESOLUTION:
            x = F.interpolate(x, size=(TOY_RESOLUTION, TOY_RESOLUTION), mode="bilinear", align_corners=False)
        return self.body(x)


def _true_batch(n: int, g: torch.Generator):
    idx = torch.randint(len(COLOURS) * len(SHAPES), (n,), generator=g)
    pairs = [(COLOURS[i % len(COLOURS)], SHAPES[i // len(COLOURS)]) for i in idx.tolist()]
    r = render_batch(pairs, sample_views(n, g, overhead_fraction=0.15), TOY_RESOLUTION, TOY_RESOLUTION, supersample=2)
    return r["rgb"], idx // len(COLOURS)


def _augment(rgb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Generated images are softer and noisier than renders: blur some, add noise to all.
    blur = F.avg_pool2d(rgb.permute(0, 3, 1, 2), 3, stride=1, padding=1, count_include_pad=False).permute(0, 2, 3, 1)
    pick = (torch.rand(rgb.shape[0], 1, 1, 1, generator=g) < 0.5).float()
    rgb = pick * blur + (1 - pick) * rgb
    return (rgb + 0.04 * torch.randn(rgb.shape, generator=g)).clamp(0, 1)


def train_shape_classifier(steps: int = 600, batch: int = 64, seed: int = 0, log=print) -> ShapeNet:
    """Train on exact renders of all 36 colour-shape pairs (the checker is the ground truth, not the
    model under test, so held-out pairs are fair game here)."""
    g = torch.Generator().manual_seed(seed)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    pool_rgb, pool_y = zip(*[_true_batch(256, g) for _ in range(8)])  # 2048 renders, re-used with augmentation
    pool_rgb, pool_y = torch.cat(pool_rgb), torch.cat(pool_y)
    for step in range(steps):
        i = torch.randint(len(pool_y), (batch,), generator=g)
        loss = F.cross_entropy(net(_augment(pool_rgb[i], g)), pool_y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            log(f"shape classifier step {step + 1} loss {loss.item():.3f}")
    return net.eval()


def shape_accuracy(net: ShapeNet, n: int = 512, seed: int = 123) -> float:
    """Accuracy on fresh exact renders (a different seed from training)."""
    rgb, y = _true_batch(n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (net(rgb).argmax(-1) == y).float().mean().item()


def load_shape_classifier(path: str | Path = CLASSIFIER_PATH) -> ShapeNet:
    from safetensors.torch import load_file

    net = ShapeNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def save_shape_classifier(net: ShapeNet, path: str | Path = CLASSIFIER_PATH) -> None:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


@torch.no_grad()
def classify_shapes(net: ShapeNet, rgb: torch.Tensor) -> list[str]:
    return [SHAPES[i] for i in net(rgb).argmax(-1).tolist()]


# ------------------------------------------------------------------------------------ depth
def depth_metrics(pred_disp: torch.Tensor, true_disp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """pred/true disparity [B, H, W], mask bool [B, H, W] (the true object). Scale and shift are fitted
    per image on the object (least squares, in disparity as for MiDaS), then AbsRel of the implied
    depth is averaged over all object pixels; Pearson r is per image, averaged."""
    absrel, pearson = [], []
    for p, t, m in zip(pred_disp, true_disp, mask):
        p, t = p[m].double(), t[m].double()
        if p.numel() < 10:
            continue
        a = torch.stack([p, torch.ones_like(p)], 1)
        s, b = torch.linalg.lstsq(a, t[:, None]).solution[:, 0]
        aligned = (s * p + b).clamp(min=1e-3)
        absrel.append(((1 / aligned - 1 / t).abs() * t).mean().item())  # |d_pred - d| / d with d = 1 / t
        pc, tc = p - p.mean(), t - t.mean()
        pearson.append((pc @ tc / (pc.norm() * tc.norm()).clamp(min=1e-12)).item())
    return {"absrel": sum(absrel) / len(absrel), "pearson": sum(pearson) / len(pearson), "images": len(absrel)}
