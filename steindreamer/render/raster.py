"""A differentiable triangle rasteriser in pure PyTorch, with nvdiffrast as an optional CUDA backend.

Conventions
- Inputs are clip-space positions (OpenGL: x, y, z in [-w, w] are visible), as nvdiffrast takes them.
- Output images are row-major with row 0 at the TOP (clip y = +1), the same as `Cameras.rays` and
  ordinary image files. (nvdiffrast's row 0 is the bottom; its output is flipped to match.)
- Pixel (i, j) samples the point at its centre: x_ndc = (2j + 1) / W - 1, y_ndc = 1 - (2i + 1) / H.
- A pixel is covered when its centre lies inside or on the edge of a triangle; both windings are drawn
  (no back-face culling); the nearest fragment (smallest z/w) wins, ties go to the lower face index.
- No clipping against the near plane: a triangle with a vertex at w <= 0 (behind the camera) is
  dropped, fragments with z/w outside [-1, 1] are discarded per pixel.

Gradients (as nvdiffrast without `antialias`): the barycentrics, and through them every interpolated
attribute and the depth, are differentiable w.r.t. the clip positions and the attributes. Which
triangle covers a pixel is a discrete choice and has no gradient, so silhouettes do not move from
image-space losses on the coverage mask alone.

Memory bound of the PyTorch path: work is split into (triangle, tile) pairs whose candidate pixels
are the triangle's pixel bounding box clipped to a `tile` x `tile` square, and pairs are processed in
chunks of at most max(`max_fragments`, tile^2) candidate pixels (~150 bytes each, no autograd:
~150 MB at the default 2^20).
Peak memory is therefore O(max(max_fragments, tile^2)) for the scan, plus O(B*H*W) for the z-buffer
and outputs and O(B*F) for per-triangle setup, whatever the triangles' screen sizes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from steindreamer.backends import raster_backend

_W_EPS = 1e-8  # vertices with clip w below this are behind the camera
_NO_HIT = torch.iinfo(torch.int64).max


@dataclass
class Rast:
    """Per-pixel rasteriser output, images [B, H, W, ...] with row 0 at the top."""

    tri_id: torch.Tensor  # [B, H, W] int64 face index, -1 where empty
    bary: torch.Tensor  # [B, H, W, 3] perspective-correct barycentrics of the face's 3 corners; 0 where empty
    depth: torch.Tensor  # [B, H, W] clip w at the pixel (view depth along -z for a perspective camera); 0 where empty
    raw: torch.Tensor | None = None  # nvdiffrast's own [B, H, W, 4] output (its row order), for dr.interpolate

    @property
    def mask(self) -> torch.Tensor:
        return self.tri_id >= 0


# ----------------------------------------------------------------------------------------------
# Cameras -> clip space


def perspective(fov: torch.Tensor, aspect: float, near: float = 0.01, far: float = 100.0) -> torch.Tensor:
    """OpenGL projection matrices [B, 4, 4] from vertical fov (radians, [B]) and width/height aspect."""
    fov = torch.as_tensor(fov, dtype=torch.float32).reshape(-1)
    f = 1.0 / torch.tan(0.5 * fov)
    proj = torch.zeros(fov.shape[0], 4, 4, dtype=fov.dtype, device=fov.device)
    proj[:, 0, 0] = f / aspect
    proj[:, 1, 1] = f
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2.0 * far * near / (far - near)
    proj[:, 3, 2] = -1.0
    return proj


def mvp_matrices(cameras, height: int, width: int, near: float = 0.01, far: float = 100.0) -> torch.Tensor:
    """World -> clip matrices [B, 4, 4] for `steindreamer.cameras.Cameras` (OpenGL frames)."""
    c2w = cameras.c2w
    w2c = torch.linalg.inv(c2w)
    return perspective(cameras.fov.to(c2w), width / height, near, far).to(c2w) @ w2c


def world_to_clip(vertices: torch.Tensor, cameras, height: int, width: int, near: float = 0.01, far: float = 100.0) -> torch.Tensor:
    """Clip positions [B, V, 4] of world vertices ([V, 3] shared or [B, V, 3]) seen by `cameras`.

    Pixel centres match `cameras.rays(height, width)`: a point on the ray through pixel (i, j)
    projects to pixel (i, j)."""
    mvp = mvp_matrices(cameras, height, width, near, far).to(vertices)
    homo = torch.cat([vertices, torch.ones_like(vertices[..., :1])], -1)
    if homo.dim() == 2:
        return torch.einsum("vj,bij->bvi", homo, mvp)
    return torch.einsum("bvj,bij->bvi", homo, mvp)


# ----------------------------------------------------------------------------------------------
# Rasterisation


def rasterize(
    clip_pos: torch.Tensor,
    faces: torch.Tensor,
    height: int,
    width: int,
    tile: int | None = 128,
    max_fragments: int = 1 << 20,
    backend: str = "auto",
) -> Rast:
    """Rasterise triangles `faces` [F, 3] of clip-space vertices `clip_pos` ([B, V, 4] or [V, 4]).

    `tile`: side of the square image tiles the scan works in (None: the whole image as one tile); the
    result does not depend on it, only the memory bound does (see the module docstring).
    `backend`: "auto" (nvdiffrast on CUDA when importable), "torch" or "nvdiffrast"."""
    if clip_pos.dim() == 2:
        clip_pos = clip_pos.unsqueeze(0)
    if clip_pos.dim() != 3 or clip_pos.shape[-1] != 4:
        raise ValueError(f"clip_pos must be [B, V, 4] or [V, 4], got {tuple(clip_pos.shape)}")
    faces = torch.as_tensor(faces, device=clip_pos.device).long()
    if raster_backend(clip_pos.device, backend) == "nvdiffrast":
        return _rasterize_nvdiffrast(clip_pos, faces, height, width)
    return _rasterize_torch(clip_pos, faces, height, width, tile, max_fragments)


def _edge_setup(ax, ay, bx, by):
    """Per-edge constants (x0, y0, dx, dy) such that e(p) = dx * (py - y0) - dy * (px - x0) is the
    edge function of a -> b. The endpoints are put in a canonical order and the sign folded into
    (dx, dy), so two triangles sharing an edge get bitwise-opposite values (IEEE negation is exact):
    a pixel centre on a shared edge is never missed by both (watertight coverage)."""
    swap = (ax > bx) | ((ax == bx) & (ay > by))
    x0, y0 = torch.where(swap, bx, ax), torch.where(swap, by, ay)
    dx, dy = torch.where(swap, ax, bx) - x0, torch.where(swap, ay, by) - y0
    return x0, y0, torch.where(swap, -dx, dx), torch.where(swap, -dy, dy)


def _screen(clip: torch.Tensor, height: int, width: int):
    """Pixel-space x (columns) and y (rows, downwards), and z/w, of clip positions [..., 4]."""
    w = clip[..., 3].clamp_min(_W_EPS)
    sx = (clip[..., 0] / w + 1.0) * (0.5 * width)
    sy = (1.0 - clip[..., 1] / w) * (0.5 * height)
    return sx, sy, clip[..., 2] / w


def _barycentrics(tri_clip: torch.Tensor, px: torch.Tensor, py: torch.Tensor, height: int, width: int):
    """Unnormalised screen-space barycentrics [N, 3] (edge values; divide by their sum) of pixel
    points (px, py) in triangles tri_clip [N, 3, 4]; differentiable w.r.t. tri_clip."""
    sx, sy, _ = _screen(tri_clip, height, width)
    dx, dy = sx - px.unsqueeze(-1), sy - py.unsqueeze(-1)  # corners relative to the pixel centre
    nxt, prv = [1, 2, 0], [2, 0, 1]
    return dx[:, nxt] * dy[:, prv] - dx[:, prv] * dy[:, nxt]


def _rasterize_torch(clip_pos, faces, height, width, tile, max_fragments) -> Rast:
    b, _, _ = clip_pos.shape
    n_faces = faces.shape[0]
    device = clip_pos.device
    n_pix = b * height * width
    zbuf = torch.full((n_pix,), _NO_HIT, dtype=torch.int64, device=device)
    tile = max(height, width) if tile is None else int(tile)
    if n_faces > 0:
        with torch.no_grad():
            _scan(clip_pos.detach().float(), faces, height, width, tile, max(int(max_fragments), tile * tile), zbuf)

    # Resolve: the winner's face index is in the key's low 32 bits.
    hit = zbuf != _NO_HIT
    pix = hit.nonzero().squeeze(1)
    face = (zbuf[pix] & 0xFFFFFFFF).long()
    batch = torch.div(pix, height * width, rounding_mode="floor")
    rem = pix - batch * height * width
    row = torch.div(rem, width, rounding_mode="floor")
    col = rem - row * width

    # Differentiable pass over covered pixels only: barycentrics from the (autograd) positions.
    tri_clip = clip_pos[batch[:, None], faces[face]]  # [N, 3, 4]
    e = _barycentrics(tri_clip, col.to(clip_pos.dtype) + 0.5, row.to(clip_pos.dtype) + 0.5, height, width)
    bary_screen = e / e.sum(-1, keepdim=True)
    inv_w = bary_screen / tri_clip[..., 3]  # perspective correction: interpolate 1/w linearly on screen
    denom = inv_w.sum(-1, keepdim=True)
    bary = inv_w / denom
    depth = 1.0 / denom.squeeze(-1)

    tri_id = torch.full((n_pix,), -1, dtype=torch.int64, device=device)
    tri_id[pix] = face
    bary_img = clip_pos.new_zeros(n_pix, 3).index_put((pix,), bary)
    depth_img = clip_pos.new_zeros(n_pix).index_put((pix,), depth)
    return Rast(tri_id.view(b, height, width), bary_img.view(b, height, width, 3), depth_img.view(b, height, width))


def _scan(clip, faces, height, width, tile, cap, zbuf) -> None:
    """Fills zbuf [B*H*W] with min over covering fragments of (depth bits << 32 | face index)."""
    n_faces = faces.shape[0]
    device = clip.device
    tri = clip[:, faces]  # [B, F, 3, 4]
    sx, sy, sz = _screen(tri, height, width)
    area = (sx[..., 1] - sx[..., 0]) * (sy[..., 2] - sy[..., 0]) - (sx[..., 2] - sx[..., 0]) * (sy[..., 1] - sy[..., 0])
    # Pixel index ranges whose centres (j + 0.5) can fall inside the triangle's bounding box.
    j0 = torch.ceil(sx.amin(-1) - 0.5).clamp(0, width - 1)
    j1 = torch.floor(sx.amax(-1) - 0.5).clamp(-1, width - 1)
    i0 = torch.ceil(sy.amin(-1) - 0.5).clamp(0, height - 1)
    i1 = torch.floor(sy.amax(-1) - 0.5).clamp(-1, height - 1)
    valid = (
        (tri[..., 3] > _W_EPS).all(-1)
        & torch.isfinite(sx).all(-1) & torch.isfinite(sy).all(-1)
        & (area.abs() > 1e-12)
        & (j1 >= j0) & (i1 >= i0)
        & (sz.amax(-1) >= -1.0) & (sz.amin(-1) <= 1.0)
        & (sx.amax(-1) >= 0) & (sx.amin(-1) <= width) & (sy.amax(-1) >= 0) & (sy.amin(-1) <= height)
    )
    flat = valid.reshape(-1).nonzero().squeeze(1)  # flat index batch * F + face
    if flat.numel() == 0:
        return
    j0, j1, i0, i1 = (t.reshape(-1)[flat].long() for t in (j0, j1, i0, i1))
    sx, sy, sz = (t.reshape(-1, 3)[flat] for t in (sx, sy, sz))
    # One gather per fragment fetches everything it needs.
    packed = torch.stack(
        [*_edge_setup(sx[:, 1], sy[:, 1], sx[:, 2], sy[:, 2]),  # edge opposite corner 0
         *_edge_setup(sx[:, 2], sy[:, 2], sx[:, 0], sy[:, 0]),
         *_edge_setup(sx[:, 0], sy[:, 0], sx[:, 1], sy[:, 1]),
         sz[:, 0], sz[:, 1], sz[:, 2]], 0)

    # (triangle, tile) pairs: tiles touched by each bounding box.
    tx0, tx1, ty0, ty1 = j0 // tile, j1 // tile, i0 // tile, i1 // tile
    ntx = tx1 - tx0 + 1
    n_pairs = ntx * (ty1 - ty0 + 1)
    owner = torch.repeat_interleave(torch.arange(flat.numel(), device=device), n_pairs)
    start = torch.cumsum(n_pairs, 0) - n_pairs
    k = torch.arange(owner.numel(), device=device) - start[owner]
    tx = tx0[owner] + k % ntx[owner]
    ty = ty0[owner] + torch.div(k, ntx[owner], rounding_mode="floor")
    pj0 = torch.maximum(j0[owner], tx * tile)
    pj1 = torch.minimum(j1[owner], tx * tile + tile - 1)
    pi0 = torch.maximum(i0[owner], ty * tile)
    pi1 = torch.minimum(i1[owner], ty * tile + tile - 1)
    pw = pj1 - pj0 + 1
    counts = pw * (pi1 - pi0 + 1)
    ends = torch.cumsum(counts, 0)

    # Chunks of consecutive pairs with at most `cap` candidate pixels (a single pair has <= tile^2).
    bounds = [0]
    while bounds[-1] < owner.numel():
        done = int(ends[bounds[-1] - 1]) if bounds[-1] > 0 else 0
        nxt = int(torch.searchsorted(ends, torch.tensor(done + cap, device=device), right=True))
        bounds.append(max(nxt, bounds[-1] + 1))

    hw = height * width
    for a, z in zip(bounds[:-1], bounds[1:]):
        c = counts[a:z]
        frag_pair = torch.repeat_interleave(torch.arange(a, z, device=device), c)
        local = torch.arange(frag_pair.numel(), device=device) - (torch.cumsum(c, 0) - c).repeat_interleave(c)
        col = pj0[frag_pair] + local % pw[frag_pair]
        row = pi0[frag_pair] + torch.div(local, pw[frag_pair], rounding_mode="floor")
        t = owner[frag_pair]
        d = packed[:, t]  # [15, N] contiguous rows: per edge (x0, y0, dx, dy), then z/w of the 3 corners
        px, py = col.float() + 0.5, row.float() + 0.5
        e0 = d[2] * (py - d[1]) - d[3] * (px - d[0])
        e1 = d[6] * (py - d[5]) - d[7] * (px - d[4])
        e2 = d[10] * (py - d[9]) - d[11] * (px - d[8])
        s = e0 + e1 + e2
        sign = torch.sign(s)
        inside = (e0 * sign >= 0) & (e1 * sign >= 0) & (e2 * sign >= 0) & (s != 0)
        z = (e0 * d[12] + e1 * d[13] + e2 * d[14]) / torch.where(s == 0, torch.ones_like(s), s)
        inside &= (z >= -1.0) & (z <= 1.0)
        if not bool(inside.any()):
            continue
        t, row, col, z = t[inside], row[inside], col[inside], z[inside]
        g = flat[t]
        batch = torch.div(g, n_faces, rounding_mode="floor")
        face = g - batch * n_faces
        # Non-negative float32 bit patterns sort like the floats: depth in the high bits, face in the low.
        zbits = ((z + 1.0) * 0.5).clamp(0.0, 1.0).contiguous().view(torch.int32).long()
        key = (zbits << 32) | face
        zbuf.scatter_reduce_(0, batch * hw + row * width + col, key, reduce="amin", include_self=True)


# ----------------------------------------------------------------------------------------------
# nvdiffrast backend


@functools.cache
def _nvdiffrast_context(device: str):
    import nvdiffrast.torch as dr  # noqa: PLC0415 - optional CUDA dependency, imported lazily

    return dr.RasterizeCudaContext(device=torch.device(device))


def _rasterize_nvdiffrast(clip_pos, faces, height, width) -> Rast:
    import nvdiffrast.torch as dr  # noqa: PLC0415

    ctx = _nvdiffrast_context(str(clip_pos.device))
    tri = faces.int().contiguous()
    raw, _ = dr.rasterize(ctx, clip_pos.float().contiguous(), tri, resolution=[height, width])
    out = raw.flip(1)  # nvdiffrast's row 0 is the bottom
    tri_id = out[..., 3].round().long() - 1
    mask = (tri_id >= 0).unsqueeze(-1)
    u, v = out[..., 0], out[..., 1]
    bary = torch.stack([u, v, 1.0 - u - v], -1) * mask  # nvdiffrast: a0*u + a1*v + a2*(1-u-v)
    rast = Rast(tri_id, bary, out.new_zeros(out.shape[:3]), raw=raw)
    w = clip_pos[..., 3:4]
    rast.depth = interpolate(w.float(), rast, faces).squeeze(-1)  # w is affine in view space: exact
    return rast


# ----------------------------------------------------------------------------------------------
# Attributes


def interpolate(attr: torch.Tensor, rast: Rast, faces: torch.Tensor) -> torch.Tensor:
    """Per-pixel attributes [B, H, W, C] from per-vertex `attr` ([V, C] shared or [B, V, C]),
    perspective-correct, zero where empty; differentiable w.r.t. attr and rast.bary."""
    faces = torch.as_tensor(faces, device=rast.tri_id.device).long()
    if rast.raw is not None:
        import nvdiffrast.torch as dr  # noqa: PLC0415

        out, _ = dr.interpolate(attr.float().contiguous(), rast.raw, faces.int().contiguous())
        return out.flip(1)
    b, h, w = rast.tri_id.shape
    mask = rast.mask
    corners = faces[rast.tri_id.clamp_min(0)]  # [B, H, W, 3]
    if attr.dim() == 2:
        values = attr[corners]  # [B, H, W, 3, C]
    else:
        values = attr[torch.arange(b, device=attr.device).view(b, 1, 1, 1), corners]
    out = (rast.bary.unsqueeze(-1).to(values.dtype) * values).sum(-2)
    return out * mask.unsqueeze(-1).to(out.dtype)


def rasterize_uv(uvs: torch.Tensor, faces_uv: torch.Tensor, size: int, tile: int | None = 256, backend: str = "auto") -> Rast:
    """Rasterise a UV layout into a size x size texture: texel (row r, col c) samples
    uv = ((c + 0.5) / size, 1 - (r + 0.5) / size), i.e. v grows upwards and image row 0 is v = 1,
    the OBJ / trimesh convention (trimesh flips v itself when writing glTF)."""
    uvs = torch.as_tensor(uvs, dtype=torch.float32)
    clip = torch.cat([uvs * 2.0 - 1.0, torch.zeros_like(uvs[:, :1]), torch.ones_like(uvs[:, :1])], -1)
    return rasterize(clip, faces_uv, size, size, tile=tile, backend=backend)


__all__ = ["Rast", "perspective", "mvp_matrices", "world_to_clip", "rasterize", "interpolate", "rasterize_uv"]
