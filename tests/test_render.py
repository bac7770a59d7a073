import math

import torch

from steindreamer.cameras import make_cameras
from steindreamer.field.nerf import Background, BackgroundConfig
from steindreamer.render.volume import RenderConfig, ray_sphere, render_rays, render_views


class ConstantSphere(torch.nn.Module):
    """Density `sigma` inside radius r, 0 outside; red albedo."""

    def __init__(self, sigma: float, radius: float, bound: float = 1.0):
        super().__init__()
        self.sigma, self.radius = sigma, radius
        self.cfg = type("C", (), {"bound": bound})()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        inside = (x.norm(dim=-1) < self.radius).to(x.dtype)
        albedo = torch.tensor([1.0, 0.0, 0.0]).expand(*x.shape[:-1], 3)
        return self.sigma * inside + 0 * self.dummy, albedo


def test_ray_sphere_intersection():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 5.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    near, far = ray_sphere(o, d, 1.0)
    assert torch.allclose(near[0], torch.tensor(2.0)) and torch.allclose(far[0], torch.tensor(4.0))
    assert near[1] == far[1]  # missed


def test_empty_field_renders_background_with_zero_opacity():
    field = ConstantSphere(sigma=0.0, radius=0.5)
    cams = make_cameras([10.0, 30.0], [0.0, 120.0], [2.0, 2.0], [50.0, 50.0])
    bg = Background(BackgroundConfig(kind="mlp"))
    out = render_views(field, bg, cams, RenderConfig(resolution=8, samples=16))
    assert torch.all(out["opacity"] == 0)
    _, dirs = cams.rays(8, 8)
    assert torch.allclose(out["rgb"], bg(dirs), atol=1e-6)
    assert torch.all(out["depth"] == 0) and torch.all(out["disparity"] == 0)


def test_solid_sphere_matches_analytic_opacity_and_depth():
    sigma, r, dist = 3.0, 0.5, 2.0
    field = ConstantSphere(sigma=sigma, radius=r)
    o = torch.tensor([[0.0, 0.0, dist]])
    d = torch.tensor([[0.0, 0.0, -1.0]])
    out = render_rays(field, o, d, torch.ones(1, 3), RenderConfig(samples=4096), perturb=False)
    length = 2 * r
    opacity = 1 - math.exp(-sigma * length)
    # Expected hit distance given a hit: entry + mean of an exponential truncated to the chord.
    mean_s = 1 / sigma - length * math.exp(-sigma * length) / (1 - math.exp(-sigma * length))
    out = {k: v.detach() for k, v in out.items()}
    assert abs(float(out["opacity"]) - opacity) < 2e-3
    assert abs(float(out["depth"]) - (dist - r + mean_s)) < 5e-3
    assert abs(float(out["disparity"]) - 1 / (dist - r + mean_s)) < 5e-3
    # Composited colour: red weighted by opacity over a white background.
    assert torch.allclose(out["rgb"][0], torch.tensor([1.0, 1 - opacity, 1 - opacity]), atol=3e-3)


def test_normals_of_blob_point_outwards():
    from steindreamer.field.hashgrid import HashGridConfig
    from steindreamer.field.nerf import FieldConfig, NeRFField

    field = NeRFField(FieldConfig(grid=HashGridConfig(levels=2, log2_table=8, base_res=4, max_res=8), blob_density=10.0, blob_radius=0.5))
    cams = make_cameras([0.0], [0.0], [2.0], [30.0])
    out = render_views(field, Background(BackgroundConfig(kind="white")), cams, RenderConfig(resolution=8, samples=64), need_normals=True, perturb=False)
    centre = out["normal"][0, 3:5, 3:5].reshape(-1, 3)
    # The camera is on +Z: the blob's visible normals at the image centre point back to it.
    assert torch.all(centre[:, 2] > 0.8)
    assert torch.allclose(out["normal"].norm(dim=-1)[out["opacity"][..., 0] > 0.5], torch.tensor(1.0), atol=1e-4)


class SoftSphere(torch.nn.Module):
    """Smooth density 200 * sigmoid((r - |x|) / 0.01): a nearly opaque sphere with an analytic normal x / |x|; green albedo."""

    def __init__(self, radius: float = 0.5):
        super().__init__()
        self.radius, self.cfg = radius, type("C", (), {"bound": 1.0})()

    def forward(self, x):
        sigma = 200.0 * torch.sigmoid((self.radius - x.norm(dim=-1)) / 0.01)
        return sigma, torch.tensor([0.2, 0.8, 0.3]).expand(*x.shape[:-1], 3)


def test_surface_and_sample_normals_match_the_analytic_sphere_and_shade_alike():
    field = SoftSphere()
    cams = make_cameras([20.0], [30.0], [2.0], [40.0])
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.9, 0.4]]), dim=-1)
    bg = Background(BackgroundConfig(kind="white"))
    outs = {}
    for mode in ("surface", "samples", "difference"):
        cfg = RenderConfig(resolution=16, samples=256, normals=mode, normal_eps=0.005)
        with torch.no_grad():  # normals still come from autograd (density_normals enables it)
            outs[mode] = {s: render_views(field, bg, cams, cfg, shading=s, light_dir=light, perturb=False, ambient=0.3)
                          for s in ("lambertian", "textureless")}
    origins, dirs = cams.rays(16, 16)
    for mode, out in outs.items():
        o = out["lambertian"]
        solid = o["opacity"][..., 0] > 0.99
        assert int(solid.sum()) > 30
        hit_point = origins + dirs * o["depth"]  # the sphere's surface along each ray
        expected = torch.nn.functional.normalize(hit_point, dim=-1)
        cos = (o["normal"] * expected).sum(-1)[solid]
        assert float(cos.min()) > 0.995, mode
        # Lambertian: albedo * (ambient + (1 - ambient) max(0, n.l)) with the analytic normal.
        lum = 0.3 + 0.7 * (expected * light[:, None, None, :]).sum(-1, keepdim=True).clamp(min=0)
        assert torch.allclose(o["rgb"][solid], (torch.tensor([0.2, 0.8, 0.3]) * lum)[solid], atol=0.02), mode
        assert torch.allclose(out["textureless"]["rgb"][solid], lum.expand(-1, -1, -1, 3)[solid], atol=0.02), mode
    # Where the modes differ at all is the silhouette's partly transparent rays.
    for mode in ("samples", "difference"):
        diff = (outs["surface"]["lambertian"]["rgb"] - outs[mode]["lambertian"]["rgb"]).abs()
        assert float(diff.mean()) < 0.01, mode
