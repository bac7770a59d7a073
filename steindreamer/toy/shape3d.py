"""The 3D check of an exported mesh against the toy world's truth, in glTF's frame (+Y up, world units).

It measures the mesh as a viewer loads it (trimesh reading the GLB), never the NeRF:
- volumetric IoU with the true primitive: both voxelised on one grid, the mesh by ray parity along
  the three axes with a majority vote (a small gap in the surface cannot flood a whole column);
- Chamfer distance (mean of both directions) and normal consistency (mean |cos| between the mesh's
  face normal and the true normal at the nearest true surface point) on area-uniform samples;
- colour: the texture at those samples against the palette (mean error, majority colour);
- shape: a classification independent of the prompt: the primitive whose solid, scaled to the
  mesh's volume, centred on its centroid and turned about +Y to fit best, overlaps the mesh most
  (free of scale, position and yaw, so it judges the shape alone);
- what a person looks for: the share of surface facing the six axis directions (a cube's faces),
  a through hole on the vertical axis (a torus), an apex (top cross-section vs the middle one), a
  flat closed bottom (bottom cross-section vs the largest).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .checker import pixel_colours
from .world import COLOURS, PALETTE, SDFS, SHAPES, _normal, parse_caption, turn

GRID, EXTENT = 64, 0.72  # voxel grid over [-EXTENT, EXTENT]^3; every shape lies inside radius 0.6
AXIS_DEG = 20.0  # a normal within this angle of an axis counts as facing it
# A cube's faces "cluster on the six directions" above this share: the exact cube meshed has 0.94,
# the roundest-sided shape with flat caps (the cylinder) 0.61.
CUBE_FACES_SHARE = 0.75
YAWS = {"cube": np.arange(0.0, 90.0, 5.0), "pyramid": np.arange(0.0, 90.0, 5.0)}  # 4-fold: 0-85 degrees; others round
SAMPLES = 20000


def centres(n: int = GRID, extent: float = EXTENT) -> np.ndarray:
    return -extent + (np.arange(n) + 0.5) * (2 * extent / n)


# ------------------------------------------------------------------------------- voxelisation
def _parity(tri: np.ndarray, axis: int, c: np.ndarray) -> np.ndarray:
    """Inside test by ray parity along `axis` for every voxel centre: bool [n, n, n] (x, y, z order)."""
    n = len(c)
    pitch = c[1] - c[0]
    a, b = [k for k in range(3) if k != axis]
    # Columns sit a hair off the voxel centres so no ray runs exactly through a shared vertex or edge.
    off = pitch * np.array([1e-3 * np.pi, 1e-3 * np.e])
    p0, p1, p2 = tri[:, 0], tri[:, 1], tri[:, 2]
    lo = np.minimum(np.minimum(p0, p1), p2)
    hi = np.maximum(np.maximum(p0, p1), p2)
    i0 = np.clip(np.ceil((lo[:, [a, b]] - c[0] - off) / pitch), 0, n).astype(int)
    i1 = np.clip(np.floor((hi[:, [a, b]] - c[0] - off) / pitch), -1, n - 1).astype(int)
    span = (i1 - i0 + 1).clip(min=0)
    counts = np.zeros((n, n, n + 1), dtype=np.int32)
    for da in range(int(span[:, 0].max(initial=0))):
        for db in range(int(span[:, 1].max(initial=0))):
            keep = (da < span[:, 0]) & (db < span[:, 1])
            if not keep.any():
                continue
            ia, ib = i0[keep, 0] + da, i0[keep, 1] + db
            qa, qb = c[ia] + off[0], c[ib] + off[1]
            t0, t1, t2 = p0[keep], p1[keep], p2[keep]
            # 2D barycentric coordinates of the column (qa, qb) in the projected triangle
            d = (t1[:, b] - t2[:, b]) * (t0[:, a] - t2[:, a]) + (t2[:, a] - t1[:, a]) * (t0[:, b] - t2[:, b])
            ok = np.abs(d) > 1e-18
            d = np.where(ok, d, 1.0)
            w0 = ((t1[:, b] - t2[:, b]) * (qa - t2[:, a]) + (t2[:, a] - t1[:, a]) * (qb - t2[:, b])) / d
            w1 = ((t2[:, b] - t0[:, b]) * (qa - t2[:, a]) + (t0[:, a] - t2[:, a]) * (qb - t2[:, b])) / d
            w2 = 1 - w0 - w1
            hit = ok & (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
            depth = w0 * t0[:, axis] + w1 * t1[:, axis] + w2 * t2[:, axis]
            # the crossing lies below voxel centres j >= first: count it from there on
            first = np.clip(np.ceil((depth - c[0]) / pitch), 0, n).astype(int)
            np.add.at(counts, (ia[hit], ib[hit], first[hit]), 1)
    inside = (np.cumsum(counts, axis=2)[..., :n] % 2) == 1  # [a, b, axis]
    order = np.argsort([a, b, axis])
    return inside.transpose(order)


def voxelise(vertices: np.ndarray, faces: np.ndarray, n: int = GRID, extent: float = EXTENT) -> np.ndarray:
    """Occupancy of a triangle mesh on the check's grid (majority of three parity tests)."""
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]
    c = centres(n, extent)
    votes = sum(_parity(tri, axis, c).astype(np.int8) for axis in range(3))
    return votes >= 2


def grid_points(n: int = GRID, extent: float = EXTENT) -> torch.Tensor:
    c = torch.from_numpy(centres(n, extent)).float()
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1)  # [n, n, n, 3]


def true_occupancy(shape: str, n: int = GRID, extent: float = EXTENT) -> np.ndarray:
    with torch.no_grad():
        return (SDFS[shape](grid_points(n, extent)) < 0).numpy()


# ------------------------------------------------------------------------------- shape classification
def _moments(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and spread (vertical, horizontal) of a solid's points: std of y, rms distance from
    the vertical axis through the centroid."""
    c = pts.mean(0)
    d = pts - c
    return c, np.array([d[:, 1].std(), np.sqrt((d[:, 0] ** 2 + d[:, 2] ** 2).mean())])


@lru_cache(maxsize=None)
def _template_moments(shape: str) -> tuple[np.ndarray, np.ndarray]:
    return _moments(grid_points(128).numpy()[true_occupancy(shape, 128)])


def classify(occ: np.ndarray, n: int = GRID, extent: float = EXTENT) -> dict:
    """The best-fitting primitive for an occupancy grid, free of position, yaw and of the vertical
    and horizontal scale (each template is stretched to the solid's spread along and across +Y), so
    what decides is the profile and the cross-sections' form: a squat cylinder is still a cylinder,
    a cube averaged over yaw is not a cube. Returns {"shape", "fit": {shape: best IoU}, "yaw"}."""
    if not occ.any():
        return {"shape": None, "fit": {s: 0.0 for s in SHAPES}, "yaw": {s: 0.0 for s in SHAPES}}
    pts = grid_points(n, extent)
    centroid, spread = _moments(pts.numpy()[occ])
    occ_t = torch.from_numpy(occ)
    fit, yaw = {}, {}
    with torch.no_grad():
        for s in SHAPES:
            c_s, spread_s = _template_moments(s)
            k = spread_s / np.maximum(spread, 1e-6)
            scale = torch.tensor([k[1], k[0], k[1]], dtype=torch.float32)
            local = (pts - torch.from_numpy(centroid).float()) * scale
            best = (-1.0, 0.0)
            for deg in YAWS.get(s, [0.0]):
                q = turn(local, -float(deg)) + torch.from_numpy(c_s).float()
                tmpl = SDFS[s](q) < 0
                iou = float((tmpl & occ_t).sum()) / max(1, int((tmpl | occ_t).sum()))
                best = max(best, (iou, float(deg)))
            fit[s], yaw[s] = best
    return {"shape": max(fit, key=fit.get), "fit": fit, "yaw": yaw}


# ------------------------------------------------------------------------------- features
def _sections(occ: np.ndarray) -> np.ndarray:
    """Cross-section area (voxels) of each occupied horizontal slice, bottom to top."""
    area = occ.sum(axis=(0, 2))
    rows = np.nonzero(area)[0]
    return area[rows[0]: rows[-1] + 1] if len(rows) else area[:0]


def features(occ: np.ndarray, normals: np.ndarray, n: int = GRID, extent: float = EXTENT) -> dict:
    """What a person checks by eye. `normals` are unit face normals of area-uniform samples."""
    cos = np.cos(np.deg2rad(AXIS_DEG))
    axis_share = 0.0
    for deg in np.arange(0.0, 90.0, 5.0):  # in the best yaw: a turned cube's faces still count
        nrm = turn(torch.from_numpy(normals).float(), -float(deg)).numpy() if len(normals) else normals
        axis_share = max(axis_share, float((np.abs(nrm).max(axis=1) > cos).mean()) if len(nrm) else 0.0)
    sec = _sections(occ)
    out = {"axis_facing_share": axis_share, "hole_open": False, "apex_ratio": float("nan"), "bottom_ratio": float("nan"),
           "height": 0.0}
    if len(sec) < 4:
        return out
    h = len(sec)
    out["height"] = float(h * 2 * extent / n)
    mid = sec[h // 2]
    out["apex_ratio"] = float(sec[int(0.9 * h):].mean() / max(1, sec[int(0.35 * h): int(0.65 * h) + 1].mean()))
    out["bottom_ratio"] = float(sec[: max(1, h // 16)].mean() / max(1, sec.max()))
    # a through hole: the vertical column at the centroid (3 x 3 voxels) empty over the full height
    pts = np.argwhere(occ)
    cx, cz = np.round(pts[:, [0, 2]].mean(0)).astype(int)
    column = occ[max(0, cx - 1): cx + 2, :, max(0, cz - 1): cz + 2]
    out["hole_open"] = bool(mid > 0 and not column.any())
    return out


# ------------------------------------------------------------------------------- the check
def _true_surface(shape: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform points on the true surface and their normals (marching cubes of the SDF at 128^3,
    sampled, then projected onto the exact surface along the SDF gradient)."""
    import mcubes
    import trimesh

    occ_sdf = SDFS[shape](grid_points(128)).numpy()
    v, f = mcubes.marching_cubes(-occ_sdf, 0.0)
    v = -EXTENT + (v + 0.5) * (2 * EXTENT / 128)
    pts, _ = trimesh.sample.sample_surface(trimesh.Trimesh(v, f, process=False), count, seed=seed)
    sdf = SDFS[shape]
    p = torch.from_numpy(pts).float()
    with torch.no_grad():
        for _ in range(3):  # central differences: the cone's SDF has no autograd gradient at its axis
            p = p - sdf(p)[:, None] * _normal(sdf, p)
        return p.numpy(), _normal(sdf, p).numpy()


def check_mesh(mesh, colour: str, shape: str, seed: int = 0) -> dict:
    """The full check of a trimesh mesh (with or without a texture) against (colour, shape)."""
    import trimesh
    from scipy.spatial import cKDTree

    if colour not in PALETTE or shape not in SDFS:
        raise ValueError(f"unknown colour or shape: {colour!r}, {shape!r}")
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    occ = voxelise(v, f)
    truth = true_occupancy(shape)
    iou = float((occ & truth).sum() / max(1, (occ | truth).sum()))
    pts, face_idx, bary = trimesh.sample.sample_surface(mesh, SAMPLES, seed=seed, return_barycentric=True)
    normals = np.asarray(mesh.face_normals)[face_idx]
    rgb = _texture_colours(mesh, face_idx, bary)
    tpts, tnormals = _true_surface(shape, SAMPLES, seed)
    d_mt, nearest = cKDTree(tpts).query(pts)
    d_tm, _ = cKDTree(pts).query(tpts)
    out = {"volumetric_iou": iou, "chamfer": float(0.5 * (d_mt.mean() + d_tm.mean())),
           "normal_consistency": float(np.abs((normals * tnormals[nearest]).sum(1)).mean()),
           "faces": int(len(f)), "volume": float(occ.sum() * (2 * EXTENT / GRID) ** 3),
           "true_volume": float(truth.sum() * (2 * EXTENT / GRID) ** 3)}
    if rgb is not None:
        votes = torch.bincount(pixel_colours(rgb), minlength=len(COLOURS))
        out["colour"] = COLOURS[int(votes.argmax())]
        out["colour_error"] = float((rgb.mean(0) - torch.tensor(PALETTE[colour])).norm())
    else:
        out["colour"], out["colour_error"] = None, float("nan")
    cls = classify(occ)
    out.update(shape=cls["shape"], shape_fit=cls["fit"], features=features(occ, normals),
               true_features=_true_features(shape))
    out["shape_right"] = out["shape"] == shape
    out["colour_right"] = out["colour"] == colour
    out["right"] = out["shape_right"] and out["colour_right"]
    return out


def _texture_colours(mesh, face_idx: np.ndarray, bary: np.ndarray) -> torch.Tensor | None:
    """The base-colour texture at surface samples (RGB in [0, 1]), or None for an untextured mesh."""
    import trimesh

    visual = mesh.visual
    if not isinstance(visual, trimesh.visual.TextureVisuals) or visual.uv is None:
        return None
    material = visual.material
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None:
        return None
    uv = (np.asarray(visual.uv)[np.asarray(mesh.faces)[face_idx]] * bary[:, :, None]).sum(1)
    colours = trimesh.visual.color.uv_to_color(uv, image)
    return torch.from_numpy(np.asarray(colours)[:, :3] / 255.0).float()


@lru_cache(maxsize=None)
def _true_features(shape: str) -> dict:
    pts, normals = _true_surface(shape, SAMPLES, 0)
    return features(true_occupancy(shape), normals)


def load_glb(path: str | Path):
    """The GLB as one trimesh mesh, as a viewer sees it; seams welded for the inside test is not
    needed (parity counts crossings, not connectivity)."""
    import trimesh

    scene = trimesh.load(str(path), force="scene")
    meshes = list(scene.dump()) if hasattr(scene, "dump") else [scene]
    if not meshes:
        raise ValueError(f"{path}: no mesh")
    return meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)


def check_glb(path: str | Path, prompt: str, seed: int = 0) -> dict:
    colour, shape = parse_caption(prompt)
    return {"prompt": prompt, "glb": str(path), **check_mesh(load_glb(path), colour, shape, seed)}


def primitive_mesh(shape: str, resolution: int = 96, yaw: float = 0.0, scale: float = 1.0,
                   offset=(0.0, 0.0, 0.0), noise: float = 0.0, seed: int = 0):
    """An exact primitive as a triangle mesh (marching cubes of its SDF), optionally turned about +Y,
    scaled, moved and with vertex noise: what the check's own tests feed it."""
    import mcubes
    import trimesh

    sdf = SDFS[shape](grid_points(resolution)).numpy()
    v, f = mcubes.marching_cubes(-sdf, 0.0)
    v = -EXTENT + (v + 0.5) * (2 * EXTENT / resolution)
    v = turn(torch.from_numpy(v).float(), yaw).numpy().astype(np.float64) * scale + np.asarray(offset)
    if noise:
        v = v + np.random.default_rng(seed).normal(0, noise, v.shape)
    return trimesh.Trimesh(v, f[:, ::-1], process=False)  # mcubes winds inward for -sdf: flip outward
