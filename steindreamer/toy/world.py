"""The toy world: six coloured primitives standing on world +Y, rendered exactly.

Every shape is an analytic signed distance function (exact, or for the pyramid a conservative
bound that is exact on the surface), centred at the origin with a bounding radius of 0.5-0.6.
Rays come from `steindreamer.cameras`, so the renders share the NeRF's conventions; they are
sphere-traced in torch, shaded Lambertian + ambient under one fixed world light, on white.

The built-in diffusion model and depth estimator are trained on these renders, so the 3D result
of `steindreamer generate "a red cube" --preset toy` can be checked against ground truth.
"""
from __future__ import annotations

import itertools
import math

import torch

from steindreamer.cameras import CameraConfig, Cameras, sample_cameras, view_prompt, view_suffixes

SHAPES = ("cube", "sphere", "cone", "cylinder", "torus", "pyramid")
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
# Albedos, chosen so the six stay distinguishable by chromaticity under any white-light shading.
PALETTE = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "purple": (0.55, 0.15, 0.75),
}
# Never in the training set: one per colour and shape, so each word is still seen elsewhere.
HELD_OUT = (("green", "sphere"), ("blue", "cone"), ("yellow", "torus"), ("purple", "pyramid"))
TRAIN_PAIRS = tuple((c, s) for c, s in itertools.product(COLOURS, SHAPES) if (c, s) not in HELD_OUT)

# The cameras of the toy preset (the NeRF stage uses the same numbers) and the model resolution.
TOY_CAMERA = CameraConfig(distance=(1.8, 2.2), fov=(40.0, 50.0), elevation=(-10.0, 45.0), azimuth=(-180.0, 180.0))
TOY_RESOLUTION = 32

LIGHT_DIR = (0.35, 0.85, 0.40)  # towards the light, world space (up, front, right)
AMBIENT, DIFFUSE = 0.5, 0.5
BOUND = 0.7  # every shape lies inside this sphere: rays are only marched through it

# Shape dimensions (world units). The cube's half-size is part of the tests' analytic truth.
CUBE_HALF = 0.32
SPHERE_R = 0.45
CYL_R, CYL_HALF_H = 0.30, 0.40
CONE_R, CONE_HALF_H = 0.40, 0.40  # base radius at y = -h, apex at y = +h
TORUS_R, TORUS_r = 0.36, 0.16  # ring in the XZ plane (axis +Y)
PYR_HALF, PYR_Y0, PYR_Y1 = 0.36, -0.38, 0.42  # square base half-side at y0, apex at y1


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def training_captions(with_views: bool = True) -> list[str]:
    """Every caption the built-in model was trained on (held-out pairs excluded)."""
    views = ("front view", "side view", "back view", "overhead view")
    out = [caption(c, s) for c, s in TRAIN_PAIRS]
    if with_views:
        out += [view_prompt(caption(c, s), v) for c, s in TRAIN_PAIRS for v in views]
    return out


def parse_caption(text: str) -> tuple[str, str]:
    """(colour, shape) of "a <colour> <shape>[, <view>]"; ValueError otherwise."""
    words = text.split(",")[0].split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"not a toy caption: {text!r}")
    return words[1], words[2]


# ---------------------------------------------------------------- signed distance functions
def _sdf_cube(p):
    q = p.abs() - CUBE_HALF
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def _sdf_sphere(p):
    return p.norm(dim=-1) - SPHERE_R


def _sdf_cylinder(p):
    d = torch.stack([p[..., [0, 2]].norm(dim=-1) - CYL_R, p[..., 1].abs() - CYL_HALF_H], -1)
    return d.max(dim=-1).values.clamp(max=0) + d.clamp(min=0).norm(dim=-1)


def _sdf_cone(p):
    # Exact capped cone (Inigo Quilez's sdCappedCone with the top radius 0), in the 2D (r, y) plane.
    h, r1 = CONE_HALF_H, CONE_R
    qx, qy = p[..., [0, 2]].norm(dim=-1), p[..., 1]
    cax = qx - torch.minimum(qx, torch.where(qy < 0, torch.full_like(qx, r1), torch.zeros_like(qx)))
    cay = qy.abs() - h
    k2x, k2y = -r1, 2 * h  # from the base rim to the apex
    # cb = q - k1 + k2 * clamp(dot(k1 - q, k2) / |k2|^2), with k1 = (0, h) the apex
    f = ((0 - qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y)
    f = f.clamp(0, 1)
    cbx, cby = qx + k2x * f, qy - h + k2y * f
    inside = (cbx < 0) & (cay < 0)
    d = torch.minimum(cax * cax + cay * cay, cbx * cbx + cby * cby).sqrt()
    return torch.where(inside, -d, d)


def _sdf_torus(p):
    q = torch.stack([p[..., [0, 2]].norm(dim=-1) - TORUS_R, p[..., 1]], -1)
    return q.norm(dim=-1) - TORUS_r


_PYR_SLOPE = PYR_Y1 - PYR_Y0  # side planes: (y1 - y0) |x| + h (y - y1) = 0, normalised


def _sdf_pyramid(p):
    # Maximum of the five face planes' signed distances: exact on and inside the surface and a lower
    # bound outside (the solid is convex), which is all sphere tracing needs.
    h, a = _PYR_SLOPE, PYR_HALF
    norm = (h * h + a * a) ** 0.5
    side = torch.maximum(p[..., 0].abs(), p[..., 2].abs())
    sides = (h * side + a * (p[..., 1] - PYR_Y1)) / norm
    return torch.maximum(sides, PYR_Y0 - p[..., 1])


SDFS = {"cube": _sdf_cube, "sphere": _sdf_sphere, "cone": _sdf_cone, "cylinder": _sdf_cylinder,
        "torus": _sdf_torus, "pyramid": _sdf_pyramid}


def _normal(sdf, p, eps: float = 1e-4):
    offsets = torch.eye(3, dtype=p.dtype, device=p.device) * eps
    g = torch.stack([sdf(p + o) - sdf(p - o) for o in offsets], -1)
    return torch.nn.functional.normalize(g, dim=-1)


@torch.no_grad()
def _trace(sdf, origins, dirs, iters: int = 96, hit_eps: float = 1e-4):
    """Sphere tracing inside the bounding sphere. origins/dirs [N, 3] → (t [N], hit [N])."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - BOUND ** 2
    disc = b * b - c
    enters = disc > 0
    sq = disc.clamp(min=0).sqrt()
    t_near, t_far = (-b - sq).clamp(min=0), -b + sq
    t = t_near.clone()
    active = enters.clone()
    for _ in range(iters):
        if not bool(active.any()):
            break
        idx = active.nonzero(as_tuple=True)[0]
        d = sdf(origins[idx] + t[idx, None] * dirs[idx])
        t[idx] = t[idx] + d
        active[idx] = (d > hit_eps) & (t[idx] < t_far[idx])
    p = origins + t[:, None] * dirs
    hit = enters & (t < t_far) & (sdf(p).abs() < 1e-3)
    return t, hit


@torch.no_grad()
def render_shape(shape: str, colour: str | tuple[float, float, float], cameras: Cameras, height: int, width: int,
                 supersample: int = 1, yaw: float = 0.0) -> dict[str, torch.Tensor]:
    """Exact render of one shape from a batch of cameras.

    Returns rgb [B,H,W,3] in [0,1] on white; depth [B,H,W,1] (distance along the ray, 0 where
    empty); disparity (1/depth, 0 where empty); mask [B,H,W,1] bool; normal [B,H,W,3] world space
    (0 where empty). With `supersample` s > 1 every pixel averages s×s rays (anti-aliased rgb, mask =
    coverage ≥ 0.5, depth/normal/disparity averaged over the pixel's hits). `yaw` turns the shape
    about +Y by that many degrees (the light stays fixed in the world).
    """
    if shape not in SDFS:
        raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    if isinstance(colour, str) and colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; colours: {', '.join(COLOURS)}")
    albedo = torch.tensor(PALETTE[colour] if isinstance(colour, str) else colour, dtype=torch.float32)
    return _render(shape, albedo.expand(len(cameras), 3), cameras, height, width, supersample, yaw)


def turn(points: torch.Tensor, degrees: float) -> torch.Tensor:
    """Points [..., 3] turned about +Y by `degrees` (x towards -z for positive angles)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    x, y, z = points.unbind(-1)
    return torch.stack([c * x + s * z, y, -s * x + c * z], -1)


def turned(sdf, degrees: float):
    """The SDF of the shape turned about +Y by `degrees`: the unturned SDF at the point turned back."""
    return sdf if not degrees else (lambda p: sdf(turn(p, -degrees)))


def _render(shape: str, albedo: torch.Tensor, cameras: Cameras, height: int, width: int, supersample: int, yaw: float = 0.0):
    s = int(supersample)
    origins, dirs = cameras.rays(height * s, width * s)
    bsz, hh, ww = origins.shape[:3]
    o, d = origins.reshape(-1, 3).float(), dirs.reshape(-1, 3).float()
    sdf = turned(SDFS[shape], yaw)
    t, hit = _trace(sdf, o, d)
    normal = torch.zeros_like(o)
    normal[hit] = _normal(sdf, o[hit] + t[hit, None] * d[hit])
    light = torch.nn.functional.normalize(torch.tensor(LIGHT_DIR, device=o.device), dim=0)
    shade = AMBIENT + DIFFUSE * (normal @ light).clamp(min=0)
    m = hit[:, None].float()
    alb = albedo.to(o.device)[:, None, :].expand(bsz, hh * ww, 3).reshape(-1, 3)
    rgb = m * (alb * shade[:, None]).clamp(0, 1) + (1 - m)  # white background
    depth = torch.where(hit, t, torch.zeros_like(t))[:, None]
    disparity = torch.where(hit, 1 / t.clamp(min=1e-6), torch.zeros_like(t))[:, None]
    out = {"rgb": rgb, "depth": depth, "disparity": disparity, "mask": m, "normal": normal}
    out = {k: v.reshape(bsz, hh, ww, -1) for k, v in out.items()}
    if s > 1:
        pool = lambda x: torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)  # noqa: E731
        cover = pool(out["mask"])
        per_hit = lambda x: pool(x) / cover.clamp(min=1e-6)  # noqa: E731 - mean over the pixel's hits
        fg = cover >= 0.5
        out = {"rgb": pool(out["rgb"]), "depth": per_hit(out["depth"]) * fg, "disparity": per_hit(out["disparity"]) * fg,
               "mask": fg, "normal": torch.nn.functional.normalize(pool(out["normal"]), dim=-1) * fg}
    else:
        out["mask"] = out["mask"] > 0.5
    return out


def render_batch(pairs: list[tuple[str, str]], cameras: Cameras, height: int, width: int,
                 supersample: int = 1) -> dict[str, torch.Tensor]:
    """Render a mixed batch: pairs[i] = (colour, shape) seen from cameras[i] (on the cameras' device)."""
    out: dict[str, torch.Tensor] = {}
    device = cameras.c2w.device
    for shape in sorted({s for _, s in pairs}):  # one trace per shape; colour is only the albedo
        idx = torch.tensor([i for i, (_, s) in enumerate(pairs) if s == shape], device=device)
        albedo = torch.tensor([PALETTE[pairs[i][0]] for i in idx.tolist()], dtype=torch.float32)
        r = _render(shape, albedo, cameras[idx], height, width, supersample)
        for k, v in r.items():
            out.setdefault(k, torch.zeros(len(pairs), *v.shape[1:], dtype=v.dtype, device=device))[idx] = v
    return out


def sample_views(n: int, generator: torch.Generator | None = None, overhead_fraction: float = 0.0,
                 elevation: tuple[float, float] | None = None) -> Cameras:
    """TOY_CAMERA views (optionally over another elevation range, e.g. from below); a fraction from
    higher up (elevation 62-85°) so "overhead view" gets trained too, even though TOY_CAMERA itself
    never reaches the overhead threshold."""
    base = TOY_CAMERA if elevation is None else CameraConfig(**{**TOY_CAMERA.__dict__, "elevation": tuple(elevation)})
    cams = sample_cameras(base, n, generator)
    k = int(round(n * overhead_fraction))
    if k:
        high = CameraConfig(**{**TOY_CAMERA.__dict__, "elevation": (62.0, 85.0)})
        hc = sample_cameras(high, k, generator)
        cams = Cameras(*(torch.cat([getattr(cams, f)[: n - k], getattr(hc, f)]) for f in
                         ("c2w", "fov", "elevation", "azimuth", "distance")))
    return cams


def view_captions(pairs: list[tuple[str, str]], cameras: Cameras) -> list[str]:
    """Full training captions: "a <colour> <shape>, <view> view" for each pair and camera."""
    return [view_prompt(caption(c, s), v) for (c, s), v in zip(pairs, view_suffixes(cameras, TOY_CAMERA))]
