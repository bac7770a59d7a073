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
