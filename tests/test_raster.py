"""The pure-PyTorch rasteriser against analytic answers, and the mesh field built on it."""
import importlib.util

import numpy as np
import pytest
import torch

from steindreamer.cameras import orbit_cameras
from steindreamer.field.mesh import MeshField
from steindreamer.render.raster import interpolate, rasterize, rasterize_uv, world_to_clip


def pixel_centres(h, w):
    """NDC coordinates of pixel centres, row 0 at the top: x [H, W], y [H, W]."""
    j = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    i = 1 - (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2
    y, x = torch.meshgrid(i, j, indexing="ij")
    return x, y


def analytic_bary(tri_xy, x, y):
    """Screen-space barycentrics of points (x, y) in a 2D triangle [3, 2] (numpy solve)."""
    a = np.array([[tri_xy[0, 0], tri_xy[1, 0], tri_xy[2, 0]], [tri_xy[0, 1], tri_xy[1, 1], tri_xy[2, 1]], [1, 1, 1]])
    rhs = np.stack([x.reshape(-1), y.reshape(-1), np.ones(x.size)])
    return np.linalg.solve(a, rhs).T.reshape(*x.shape, 3)


def icosphere(subdiv=3, radius=0.5):
    import trimesh

    m = trimesh.creation.icosphere(subdiv, radius=radius)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.int64)


def test_single_triangle_coverage_and_barycentrics():
    h, w = 24, 32
    xy = np.array([[-0.7, -0.6], [0.8, -0.3], [-0.1, 0.9]])
    clip = torch.tensor([[*p, 0.0, 1.0] for p in xy], dtype=torch.float32)
    rast = rasterize(clip, torch.tensor([[0, 1, 2]]), h, w)
    x, y = (t.numpy() for t in pixel_centres(h, w))
    bary = analytic_bary(xy, x, y)
    inside = (bary >= 0).all(-1)
    clear = (np.abs(bary) > 1e-4).all(-1)  # pixel centres not on an edge: coverage is unambiguous
    got = rast.tri_id[0].numpy() == 0
    assert inside.sum() > 50 and (~inside).sum() > 50
    np.testing.assert_array_equal(got[clear], inside[clear])
    np.testing.assert_allclose(rast.bary[0].numpy()[inside & clear], bary[inside & clear], atol=1e-5)
    assert (rast.tri_id[0][~torch.from_numpy(got)] == -1).all()
    assert rast.bary[0][~torch.from_numpy(got)].abs().max() == 0


def test_perspective_correct_interpolation_and_depth():
    """A tilted triangle in camera space: the interpolated camera-space point behind each pixel
    must project back onto that pixel's centre, and depth must be that point's distance along -z."""
    h, w = 20, 20
    f = 1.0  # 90 degrees fov, aspect 1: clip = (x, y, ..., -z)
    cam = torch.tensor([[-2.0, -1.8, -2.5], [3.0, -1.0, -4.0], [0.0, 2.5, -3.0]], dtype=torch.float64)
    near, far = 0.1, 10.0
    zc = -(far + near) / (far - near) * cam[:, 2] - 2 * far * near / (far - near)
    clip = torch.stack([f * cam[:, 0], f * cam[:, 1], zc, -cam[:, 2]], -1)
    rast = rasterize(clip, torch.tensor([[0, 1, 2]]), h, w)
    m = rast.mask[0]
    assert m.sum() > 40
    p = interpolate(cam, rast, torch.tensor([[0, 1, 2]]))[0][m]
    x, y = pixel_centres(h, w)
    np.testing.assert_allclose((p[:, 0] / -p[:, 2]).numpy(), x[m].numpy(), atol=1e-5)
    np.testing.assert_allclose((p[:, 1] / -p[:, 2]).numpy(), y[m].numpy(), atol=1e-5)
    np.testing.assert_allclose(rast.depth[0][m].numpy(), (-p[:, 2]).numpy(), rtol=1e-6)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_zbuffer_keeps_the_nearer_triangle(order):
    near_tri = [[-0.8, -0.8, -0.5, 1], [0.6, -0.8, -0.5, 1], [-0.8, 0.6, -0.5, 1]]
    far_tri = [[0.9, 0.9, 0.5, 1], [-0.9, 0.2, 0.5, 1], [0.2, -0.9, 0.5, 1]]
    clip = torch.tensor(near_tri + far_tri, dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])[list(order)]
    near_id = order.index(0)
    rast = rasterize(clip, faces, 32, 32)
    x, y = pixel_centres(32, 32)
    in_near = torch.from_numpy((analytic_bary(np.array(near_tri)[:, :2], x.numpy(), y.numpy()) > 1e-4).all(-1))
    in_far = torch.from_numpy((analytic_bary(np.array(far_tri)[:, :2], x.numpy(), y.numpy()) > 1e-4).all(-1))
    overlap = in_near & in_far
    assert overlap.sum() > 20
    assert (rast.tri_id[0][overlap] == near_id).all()
    assert (rast.tri_id[0][in_far & ~in_near] == 1 - near_id).all()
    # Depth test uses z/w: push the "near" one behind and the order flips.
    clip2 = clip.clone()
    clip2[:3, 2] = 0.9
    rast2 = rasterize(clip2, faces, 32, 32)
    assert (rast2.tri_id[0][overlap] == 1 - near_id).all()


def test_fragments_outside_depth_range_are_discarded():
    clip = torch.tensor([[-1, -1, 1.5, 1], [1, -1, 1.5, 1], [0, 1, 1.5, 1]], dtype=torch.float32)  # beyond far
    assert not rasterize(clip, torch.tensor([[0, 1, 2]]), 8, 8).mask.any()
    behind = torch.tensor([[-1, -1, 0, -1], [1, -1, 0, 1], [0, 1, 0, 1]], dtype=torch.float32)  # a vertex at w < 0
    assert not rasterize(behind, torch.tensor([[0, 1, 2]]), 8, 8).mask.any()


def test_tiling_and_chunking_do_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    n = 30
    clip = torch.cat([torch.rand(3 * n, 2, generator=g) * 2.4 - 1.2, torch.rand(3 * n, 1, generator=g) * 1.8 - 0.9, torch.ones(3 * n, 1)], -1)
    clip = clip.view(1, -1, 4).repeat(2, 1, 1)
    clip[1, :, :2] *= 0.5  # a different second view
    faces = torch.arange(3 * n).view(n, 3)
    ref = rasterize(clip, faces, 45, 67, tile=None, max_fragments=1 << 22)
    assert ref.mask.float().mean() > 0.5
    for tile, cap in [(8, 2000), (16, 5000), (32, 1 << 20)]:
        out = rasterize(clip, faces, 45, 67, tile=tile, max_fragments=cap)
        assert torch.equal(out.tri_id, ref.tri_id)
        assert torch.equal(out.bary, ref.bary)
        assert torch.equal(out.depth, ref.depth)


def test_shared_edges_are_watertight():
    """A grid of triangles covering the screen: every pixel is covered (no cracks on shared edges)."""
    k = 7
    xs = torch.linspace(-1.3, 1.2, k)
    yy, xx = torch.meshgrid(xs, xs + 0.013, indexing="ij")
    v = torch.stack([xx.reshape(-1), yy.reshape(-1), torch.zeros(k * k), torch.ones(k * k)], -1)
    v[:, :2] += 0.05 * torch.sin(7 * v[:, :2].flip(-1))  # irregular edges
    idx = torch.arange(k * k).view(k, k)
    a, b, c, d = idx[:-1, :-1].reshape(-1), idx[:-1, 1:].reshape(-1), idx[1:, :-1].reshape(-1), idx[1:, 1:].reshape(-1)
    faces = torch.cat([torch.stack([a, b, d], 1), torch.stack([a, d, c], 1)])
    rast = rasterize(v, faces, 97, 101)
    assert rast.mask.all()
    np.testing.assert_allclose(rast.bary.sum(-1).numpy(), 1.0, atol=1e-5)


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    clip0 = torch.tensor([[-0.713, -0.627, 0.1, 1.0], [0.834, -0.291, 0.2, 1.3], [-0.137, 0.912, 0.3, 0.8]], dtype=torch.float64)
    attr = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    faces = torch.tensor([[0, 1, 2]])
    weights = torch.rand(1, 24, 24, 2, dtype=torch.float64)
    coverage = rasterize(clip0, faces, 24, 24).mask

    def loss(clip):
        rast = rasterize(clip, faces, 24, 24)
        assert torch.equal(rast.mask, coverage)  # the perturbation must not change which pixels are covered
        return (interpolate(attr, rast, faces) * weights).sum() + (rast.depth * weights[..., 0]).sum()

    clip = clip0.clone().requires_grad_(True)
    loss(clip).backward()
    assert attr.grad.abs().sum() > 0
    eps = 1e-6
    for vi in range(3):
        for ci in (0, 1, 3):
            d = torch.zeros_like(clip0)
            d[vi, ci] = eps
            with torch.no_grad():
                fd = (loss(clip0 + d) - loss(clip0 - d)) / (2 * eps)
            assert abs(fd.item()) > 1e-3
            np.testing.assert_allclose(clip.grad[vi, ci].item(), fd.item(), rtol=1e-4, atol=1e-6)


def test_rasterize_uv_covers_the_unit_square():
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize_uv(uvs, faces, 16)
    assert rast.mask.all()
    # Row 0 is v = 1 (top), so interpolated v decreases down the rows.
    v = interpolate(uvs, rast, faces)[0, :, 0, 1]
    np.testing.assert_allclose(v.numpy(), 1 - (np.arange(16) + 0.5) / 16, atol=1e-6)


class ConstantColor(torch.nn.Module):
    def __init__(self, rgb):
        super().__init__()
        self.rgb = torch.nn.Parameter(torch.tensor(rgb))

    def forward(self, x):
        return self.rgb.expand(x.shape[0], 3)


def test_mesh_field_matches_ray_traced_sphere():
    verts, faces = icosphere(4, radius=0.5)
    field = MeshField(verts, faces, ConstantColor([0.2, 0.4, 0.6]))
    cams = orbit_cameras(3, elevation=20.0, distance=2.0, fov=50.0)
    h, w = 48, 64
    with torch.no_grad():
        out = field.render(cams, h, w, background=torch.tensor([1.0, 0.0, 0.0]))
    assert set(out) == {"rgb", "opacity", "depth", "disparity", "normal"}
    for k, c in [("rgb", 3), ("opacity", 1), ("depth", 1), ("disparity", 1), ("normal", 3)]:
        assert out[k].shape == (3, h, w, c), k

    origins, dirs = cams.rays(h, w)
    b = (origins * dirs).sum(-1)
    disc = b * b - ((origins * origins).sum(-1) - 0.25)
    hit = disc > 0
    t = -b - disc.clamp_min(0).sqrt()
    mask = out["opacity"][..., 0] > 0.5
    assert (mask == hit).float().mean() > 0.99
    both = mask & hit
    assert (out["depth"][..., 0][both] - t[both]).abs().max() < 0.01
    np.testing.assert_allclose(out["disparity"][..., 0][both].numpy(), 1 / out["depth"][..., 0][both].numpy(), rtol=1e-5)
    assert (out["depth"][~mask] == 0).all() and (out["disparity"][~mask] == 0).all() and (out["normal"][~mask] == 0).all()
    n = out["normal"][both]
    np.testing.assert_allclose(n.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    true_n = torch.nn.functional.normalize(origins + t.unsqueeze(-1) * dirs, dim=-1)[both]
    assert (n * true_n).sum(-1).min() > 0.99
    np.testing.assert_allclose(out["rgb"][mask].numpy(), np.tile([0.2, 0.4, 0.6], (int(mask.sum()), 1)), atol=1e-6)
    np.testing.assert_allclose(out["rgb"][~mask].numpy(), np.tile([1.0, 0.0, 0.0], (int((~mask).sum()), 1)))


def test_mesh_field_gradients_reach_geometry_and_texture():
    verts, faces = icosphere(2, radius=0.5)

    class PositionColor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return torch.sigmoid(self.lin(x))

    field = MeshField(verts, faces, PositionColor())
    out = field.render(orbit_cameras(2, distance=2.0), 32, 32, background=0.5, light_direction=torch.tensor([0.0, 1.0, 1.0]), shading="lambertian")
    (out["rgb"].square().mean() + out["depth"].mean() + out["normal"][..., 1].mean()).backward()
    assert field.offsets.grad is not None and field.offsets.grad.abs().sum() > 0
    assert field.texture_field.lin.weight.grad.abs().sum() > 0


def test_mesh_regularisers():
    import trimesh

    grid = trimesh.creation.box().subdivide().subdivide()  # flat faces except at the cube's edges
    flat_sheet = trimesh.Trimesh(*trimesh.remesh.subdivide(np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1], [1, 0, 1.0]]), np.array([[0, 2, 1], [1, 2, 3]])))
    sheet = MeshField(flat_sheet.vertices, flat_sheet.faces, ConstantColor([0.5, 0.5, 0.5]))
    assert sheet.normal_consistency_loss().item() < 1e-6
    box = MeshField(grid.vertices, grid.faces, ConstantColor([0.5, 0.5, 0.5]))
    assert box.normal_consistency_loss().item() > 1e-3

    verts, faces = icosphere(3, radius=0.5)
    smooth = MeshField(verts, faces, ConstantColor([0.5, 0.5, 0.5]))
    noisy = MeshField(verts + 0.02 * torch.randn(verts.shape, generator=torch.Generator().manual_seed(0)), faces, ConstantColor([0.5] * 3))
    assert noisy.laplacian_loss() > 5 * smooth.laplacian_loss()
    assert noisy.normal_consistency_loss() > 5 * smooth.normal_consistency_loss()
    # The losses are differentiable in the offsets, and a few gradient steps smooth the noise.
    opt = torch.optim.Adam([noisy.offsets], lr=2e-3)
    before = noisy.laplacian_loss().item()
    for _ in range(20):
        opt.zero_grad()
        (noisy.laplacian_loss() + 0.1 * noisy.normal_consistency_loss()).backward()
        opt.step()
    assert noisy.laplacian_loss().item() < 0.5 * before
    v, f = noisy.export_arrays()
    assert v.dtype == np.float32 and v.shape == tuple(verts.shape) and f.shape == tuple(faces.shape)


def _nvdiffrast_reason():
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("nvdiffrast") is None:
        return "nvdiffrast is not installed"
    return None


@pytest.mark.skipif(_nvdiffrast_reason() is not None, reason=f"nvdiffrast parity needs CUDA and nvdiffrast: {_nvdiffrast_reason()}")
def test_nvdiffrast_parity():
    verts, faces = icosphere(3, radius=0.5)
    cams = orbit_cameras(2, distance=2.0)
    clip = world_to_clip(verts.cuda(), cams.to("cuda"), 64, 80).requires_grad_(True)
    ref = rasterize(clip, faces.cuda(), 64, 80, backend="torch")
    nv = rasterize(clip, faces.cuda(), 64, 80, backend="nvdiffrast")
    assert nv.raw is not None
    agree = ref.tri_id == nv.tri_id
    assert agree.float().mean() > 0.995  # pixels exactly on edges may go either way
    both = agree & ref.mask
    assert (ref.bary[both] - nv.bary[both]).abs().max() < 1e-3
    assert ((ref.depth[both] - nv.depth[both]).abs() / ref.depth[both]).max() < 1e-4
    a = verts.cuda()
    assert (interpolate(a, ref, faces.cuda())[both] - interpolate(a, nv, faces.cuda())[both]).abs().max() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks the pure-PyTorch path on a GPU")
def test_torch_path_on_cuda_matches_cpu():
    verts, faces = icosphere(3, radius=0.5)
    cams = orbit_cameras(2, distance=2.0)
    clip = world_to_clip(verts, cams, 40, 56)
    cpu = rasterize(clip, faces, 40, 56, backend="torch")
    gpu_clip = clip.cuda().requires_grad_(True)
    gpu = rasterize(gpu_clip, faces.cuda(), 40, 56, backend="torch", tile=16)
    assert (gpu.tri_id.cpu() == cpu.tri_id).float().mean() > 0.999
    same = gpu.tri_id.cpu() == cpu.tri_id
    assert (gpu.bary.detach().cpu()[same] - cpu.bary[same]).abs().max() < 1e-4
    interpolate(verts.cuda(), gpu, faces.cuda()).sum().backward()
    assert gpu_clip.grad is not None and torch.isfinite(gpu_clip.grad).all()
    field = MeshField(verts, faces, ConstantColor([0.1, 0.2, 0.3])).cuda()
    out = field.render(cams, 40, 56)
    assert out["rgb"].is_cuda and out["opacity"].sum() > 0
