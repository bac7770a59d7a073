"""Surface extraction from a density field: coarse-to-fine marching cubes, clean-up, decimation.

Steps
1. Coarse pass: sample the density on a `coarse_resolution`^3 grid over [-bound, bound]^3, pick the
   threshold (if not given; below) and find the box holding every sample above it; pad that box by
   two coarse cells (a coarse grid can miss thin parts near its edge) and clip it to the bound.
2. Fine pass: cubic voxels, `resolution` samples along the box's longest side; the grid's outer
   layer is set below the threshold so surfaces cut by the box or the bound come out closed.
3. Cavities (fill_cavities=True, the default): every region below the threshold that is not
   connected to the grid's outside (scipy's binary_fill_holes, face-connected) is set above it, so
   the mesh is the outer shell only. Trained NeRFs are often hollow; the inner walls nobody sees
   would waste faces and confuse inside/outside tests. A through hole (a torus's) reaches the
   outside and stays open.
4. Marching cubes (PyMCubes), merge duplicate vertices, drop degenerate faces.
5. Orientation: outward normals means a positive signed volume (the outer shell encloses more
   than any cavity, whose inward-facing walls are "outward" from the material); flip otherwise.
6. Drop floating components with fewer faces than `min_component_fraction` x the largest one's.
7. Optional quadric decimation to `target_faces` (fast-simplification).

Automatic threshold (threshold=None or a rule's name):
- "silhouette" (the default, `silhouette.py`): the level whose solid {density > level} has the
  silhouettes the NeRF renders (opacity > 0.5) from 24 fixed views all around the bound sphere,
  chosen by the IoU of the two silhouettes over ~40x40 rays per view, 128 samples each. On trained
  NeRFs Otsu's level falls in the soft low-density halo around the object and inflates the mesh (a
  trained sphere: 29 % too much volume); this rule asks the renders where the surface is. When no
  ray renders opacity > 0.5 it falls back to Otsu and says so.
- "otsu": Otsu's threshold of log1p(max(density, 0)) over the coarse samples, mapped back with
  expm1: two classes (empty space, matter) maximising the between-class variance; the log makes it
  indifferent to the density's scale, to a low-density haze and to a few very dense voxels.
- "mean": threestudio's rule, the mean of the coarse densities above 1e-5.
The rule used, the threshold, the silhouette IoU reached and the seconds spent are in `info`.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Literal, get_args

import numpy as np
import torch

from ..errors import UserError
from .silhouette import silhouette_threshold


class ExtractionError(ValueError):
    """No usable surface; the message is one line naming the threshold and the density range seen."""


DensityFn = Callable[[torch.Tensor], torch.Tensor]
ThresholdRule = Literal["silhouette", "otsu", "mean"]
THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRule)


def _sample_grid(density_fn: DensityFn, lo: np.ndarray, voxel: float, shape: tuple[int, int, int], chunk: int, device) -> np.ndarray:
    """Densities at lo + voxel * (i, j, k) for the grid `shape`, as float32 [nx, ny, nz]; evaluated
    slab by slab along x so at most ~`chunk` points exist at once."""
    nx, ny, nz = shape
    out = np.empty(shape, dtype=np.float32)
    ys = torch.tensor(lo[1] + voxel * np.arange(ny), dtype=torch.float32, device=device)
    zs = torch.tensor(lo[2] + voxel * np.arange(nz), dtype=torch.float32, device=device)
    yy, zz = torch.meshgrid(ys, zs, indexing="ij")
    yz = torch.stack([yy.reshape(-1), zz.reshape(-1)], -1)  # [ny*nz, 2]
    slab = max(1, chunk // (ny * nz))
    with torch.no_grad():
        for x0 in range(0, nx, slab):
            xs = torch.tensor(lo[0] + voxel * np.arange(x0, min(nx, x0 + slab)), dtype=torch.float32, device=device)
            pts = torch.cat([xs.repeat_interleave(yz.shape[0]).unsqueeze(1), yz.repeat(xs.shape[0], 1)], 1)
            # If one slab alone exceeds `chunk` (huge ny*nz), split it further.
            vals = torch.cat([density_fn(p).reshape(-1).float() for p in pts.split(chunk)])
            out[x0 : x0 + xs.shape[0]] = vals.view(-1, ny, nz).cpu().numpy()
    return out


def auto_threshold(densities: np.ndarray, rule: str = "otsu") -> float:
    """The automatic threshold of sampled densities by rule "otsu" or "mean" (see the module
    docstring); NaN if the densities are all equal. The silhouette rule needs the density function:
    `silhouette.silhouette_threshold`."""
    d = np.asarray(densities, dtype=np.float64).reshape(-1)
    d = d[np.isfinite(d)]
    if rule == "mean":
        pos = d[d > 1e-5]
        return float(pos.mean()) if pos.size else float("nan")
    if rule != "otsu":
        raise ValueError(f"unknown threshold rule {rule!r} (expected 'otsu' or 'mean')")
    from skimage.filters import threshold_otsu  # noqa: PLC0415 - only needed here

    logd = np.log1p(np.clip(d, 0.0, None))
    if logd.size == 0 or logd.max() <= logd.min():
        return float("nan")
    return float(np.expm1(threshold_otsu(logd, nbins=1024)))


def _range_text(lo: float, hi: float) -> str:
    return f"[{lo:.4g}, {hi:.4g}]"


def extract_mesh(
    density_fn: DensityFn,
    bound: float,
    resolution: int = 128,
    threshold: float | str | None = None,
    min_component_fraction: float = 0.05,
    target_faces: int | None = None,
    chunk: int = 1 << 18,
    coarse_resolution: int = 64,
    device: str | torch.device = "cpu",
    fill_cavities: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Triangle mesh of the surface {density = threshold} of `density_fn` inside [-bound, bound]^3.

    density_fn maps [N, 3] float32 points (on `device`) to densities [N]; it is called under no_grad
    with at most `chunk` points at a time. threshold: a density, or a rule's name (THRESHOLD_RULES;
    None: "silhouette"). fill_cavities: the mesh is the outer shell only (step 3 of the module
    docstring). Returns vertices [V, 3] float32, faces [F, 3] int64 (counter-clockwise seen from
    outside, i.e. normals point away from the high-density side) and an info dict (threshold, rule,
    silhouette IoU, density range, box, grid, counts, cavity voxels filled, timings). Raises
    ExtractionError when there is no surface."""
    t_start = time.perf_counter()
    rule = "silhouette" if threshold is None else threshold if isinstance(threshold, str) else None
    if rule is not None and rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r} (expected one of {', '.join(THRESHOLD_RULES)})")
    bound = float(bound)
    coarse_n = int(max(8, min(coarse_resolution, resolution)))
    coarse_voxel = 2.0 * bound / (coarse_n - 1)
    lo_all = np.full(3, -bound)
    coarse = _sample_grid(density_fn, lo_all, coarse_voxel, (coarse_n,) * 3, chunk, device)
    finite = coarse[np.isfinite(coarse)]
    d_lo, d_hi = (float(finite.min()), float(finite.max())) if finite.size else (float("nan"), float("nan"))

    t_sampled = time.perf_counter()
    otsu_text = "auto: Otsu on log1p(density), coarse grid"
    sil_info: dict = {"silhouette_iou": None}
    if rule == "silhouette":
        level, sil_info = silhouette_threshold(density_fn, bound, chunk, device)
        if math.isfinite(level):
            rule_text = (f"auto: silhouette-calibrated (silhouette IoU {sil_info['silhouette_iou']:.3f} over "
                         f"{sil_info['silhouette_rays']} rays of {sil_info['silhouette_views']} views)")
        else:
            level = auto_threshold(coarse, "otsu")
            rule_text = f"{otsu_text} (silhouette rule: no ray renders opacity > 0.5)"
    elif rule is not None:
        level = auto_threshold(coarse, rule)
        rule_text = {"otsu": otsu_text, "mean": "auto: mean of densities > 1e-5, coarse grid"}[rule]
    else:
        level, rule_text = float(threshold), "given"
    t_threshold = time.perf_counter()

    def fail(reason: str, lo: float = d_lo, hi: float = d_hi):
        return ExtractionError(
            f"{reason}: threshold {level:.4g} ({rule_text}), density range seen {_range_text(lo, hi)} "
            f"on a {coarse_n}^3 grid over [-{bound:g}, {bound:g}]^3"
        )

    if not math.isfinite(level):
        raise fail("no surface (density constant or not finite, no threshold separates it)")

    occupied = np.argwhere(np.nan_to_num(coarse, nan=-np.inf) > level)
    if occupied.size:
        pad = 2
        box_lo = np.maximum(-bound, -bound + (occupied.min(0) - pad) * coarse_voxel)
        box_hi = np.minimum(bound, -bound + (occupied.max(0) + pad) * coarse_voxel)
    else:
        # Nothing above the threshold at coarse resolution: search the whole volume at full resolution.
        box_lo, box_hi = lo_all.copy(), np.full(3, bound)
    extent = box_hi - box_lo
    voxel = float(extent.max()) / (int(resolution) - 1)
    # Whole voxels that fit in the box along each axis, centred in it: samples stay inside the bound.
    shape = tuple(int(n) for n in np.maximum(2, np.floor(extent / voxel + 1e-6).astype(int) + 1))
    box_lo = box_lo + 0.5 * (extent - (np.array(shape) - 1) * voxel)
    t_coarse = time.perf_counter()
    fine = _sample_grid(density_fn, box_lo, voxel, shape, chunk, device)
    t_sample = time.perf_counter()
    fin = fine[np.isfinite(fine)]
    if fin.size:
        d_lo, d_hi = min(d_lo, float(fin.min())), max(d_hi, float(fin.max()))
    lvl32 = np.float32(level)
    # Value for "empty" (NaN, -inf, the capping layer): the lowest finite density if it is below the
    # threshold, else the float just below it. +inf becomes the largest finite density (or the level).
    below = np.nextafter(lvl32, np.float32(-np.inf))
    low = fin.min() if fin.size and fin.min() < lvl32 else below
    high = max(fin.max(), lvl32) if fin.size else lvl32
    fine = np.nan_to_num(fine, nan=low, posinf=high, neginf=low).astype(np.float32, copy=False)
    # The grid's outer layer is set below the threshold so surfaces cut by the box or the bound
    # are capped there (closed mesh, never beyond the bound).
    volume = fine
    for axis in range(3):
        sl = [slice(None)] * 3
        sl[axis] = [0, -1]
        volume[tuple(sl)] = low
    occ = volume > lvl32
    if not occ.any():
        raise fail("no surface (no density above the threshold)")
    n_filled = 0
    if fill_cavities:
        from scipy.ndimage import binary_fill_holes  # noqa: PLC0415

        cavity = binary_fill_holes(occ) & ~occ
        n_filled = int(cavity.sum())
        # Any value above the level will do: a cavity voxel's face neighbours are matter or cavity,
        # never outside, so its value enters no interpolated vertex.
        volume[cavity] = max(high, np.nextafter(lvl32, np.float32(np.inf)))
    del occ
    t_fill = time.perf_counter()

    import mcubes  # noqa: PLC0415
    import trimesh  # noqa: PLC0415

    verts, faces = mcubes.marching_cubes(volume, float(lvl32))
    t_mc = time.perf_counter()
    n_mc = int(len(faces))
    if n_mc == 0:
        raise fail("no surface (marching cubes produced no faces)")
    verts = box_lo + verts * voxel  # index space -> world

    mesh = trimesh.Trimesh(verts, faces, process=True)  # merges duplicate vertices
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) == 0:
        raise fail("degenerate surface (all faces have zero area)")
    # Outward orientation (see step 5): signed volume of the whole mesh.
    flipped = False
    if mesh.volume < 0:
        mesh.invert()
        flipped = True

    components = trimesh.graph.connected_components(mesh.face_adjacency, nodes=np.arange(len(mesh.faces)), min_len=1)
    sizes = np.array([len(c) for c in components])
    keep = [c for c in components if len(c) >= min_component_fraction * sizes.max()]
    if len(keep) < len(components):
        mask = np.zeros(len(mesh.faces), dtype=bool)
        mask[np.concatenate(keep)] = True
        mesh.update_faces(mask)
        mesh.remove_unreferenced_vertices()
    t_clean = time.perf_counter()

    v_out = np.asarray(mesh.vertices, dtype=np.float64)
    f_out = np.asarray(mesh.faces, dtype=np.int64)
    decimated = False
    if target_faces is not None and len(f_out) > int(target_faces):
        import fast_simplification  # noqa: PLC0415

        v_out, f_out = fast_simplification.simplify(v_out.astype(np.float32), f_out.astype(np.int32), target_count=int(target_faces))
        decimated = True
    t_dec = time.perf_counter()
    v_out = np.ascontiguousarray(v_out, dtype=np.float32)
    f_out = np.ascontiguousarray(f_out, dtype=np.int64)
    if len(f_out) < 4 or float(np.ptp(v_out, axis=0).min()) <= 0.0:
        raise fail(f"degenerate surface ({len(f_out)} faces left)")

    final = trimesh.Trimesh(v_out, f_out, process=False)
    info = {
        "threshold": float(level),
        "threshold_rule": rule_text,
        **sil_info,
        "density_min": d_lo,
        "density_max": d_hi,
        "coarse_resolution": coarse_n,
        "box_min": box_lo.tolist(),
        "box_max": box_hi.tolist(),
        "grid_shape": list(shape),
        "voxel_size": voxel,
        "cavity_voxels_filled": n_filled,
        "faces_marching_cubes": n_mc,
        "components": int(len(components)),
        "components_kept": int(len(keep)),
        "orientation_flipped": flipped,
        "decimated": decimated,
        "vertices": int(len(v_out)),
        "faces": int(len(f_out)),
        "watertight": bool(final.is_watertight),
        "seconds": {
            "coarse": (t_sampled - t_start) + (t_coarse - t_threshold),
            "threshold": t_threshold - t_sampled,
            "fine_sampling": t_sample - t_coarse,
            "cavity_fill": t_fill - t_sample,
            "marching_cubes": t_mc - t_fill,
            "cleanup": t_clean - t_mc,
            "decimation": t_dec - t_clean,
            "total": time.perf_counter() - t_start,
        },
    }
    return v_out, f_out, info


@torch.no_grad()
def extract_field_surface(field, mesh_cfg) -> tuple[np.ndarray, np.ndarray, dict]:
    """`extract_mesh` of a NeRF field with the mesh stage's settings (`mesh_cfg`: grid_resolution,
    threshold (< 0: automatic by threshold_rule), fill_cavities, min_component_fraction, target_faces);
    a field with no surface is the user's one-line error."""
    m, device = mesh_cfg, next(field.parameters()).device
    try:
        return extract_mesh(lambda x: field.density(x.to(device)).float(), field.cfg.bound, resolution=m.grid_resolution,
                            threshold=m.threshold_rule if m.threshold < 0 else m.threshold,
                            min_component_fraction=m.min_component_fraction, target_faces=m.target_faces,
                            fill_cavities=m.fill_cavities)
    except ExtractionError as err:
        raise UserError(f"mesh extraction failed: {err}") from None
