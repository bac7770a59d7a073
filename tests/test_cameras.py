import torch

from steindreamer.cameras import CameraConfig, make_cameras, orbit_cameras, sample_cameras, view_prompt, view_suffix


def test_front_camera_looks_at_origin_down_minus_z():
    cams = make_cameras([0.0], [0.0], [2.0], [60.0])
    assert torch.allclose(cams.position[0], torch.tensor([0.0, 0.0, 2.0]), atol=1e-6)
    origins, dirs = cams.rays(2, 2)
    centre = dirs[0].mean((0, 1))
    assert torch.allclose(torch.nn.functional.normalize(centre, dim=0), torch.tensor([0.0, 0.0, -1.0]), atol=1e-5)
    # Up in the image is +Y in the world: the top row's rays point upwards.
    assert dirs[0, 0, :, 1].mean() > 0 > dirs[0, 1, :, 1].mean()


def test_field_of_view_sets_edge_ray_angle():
    cams = make_cameras([0.0], [0.0], [2.0], [90.0])
    _, dirs = cams.rays(1000, 1000)
    top = dirs[0, 0, 500]
    angle = torch.rad2deg(torch.acos((top * torch.tensor([0.0, 0.0, -1.0])).sum()))
    assert abs(float(angle) - 45.0) < 0.1


def test_view_suffixes():
    assert view_suffix(10, 0) == "front view"
    assert view_suffix(10, 44) == "front view"
    assert view_suffix(10, 90) == "side view"
    assert view_suffix(10, -90) == "side view"
    assert view_suffix(10, 180) == "back view"
    assert view_suffix(10, -150) == "back view"
    assert view_suffix(70, 0) == "overhead view"
    assert view_prompt("a red cube", "side view") == "a red cube, side view"


def test_sampling_respects_ranges_and_stratifies_azimuth():
    cfg = CameraConfig(distance=(1.5, 2.0), fov=(40, 70), elevation=(-10, 45), azimuth=(-180, 180), jitter=0.0)
    g = torch.Generator().manual_seed(0)
    cams = sample_cameras(cfg, 8, g)
    assert torch.all((cams.distance >= 1.5) & (cams.distance <= 2.0))
    assert torch.all((cams.elevation >= -10) & (cams.elevation <= 45))
    fov = torch.rad2deg(cams.fov)
    assert torch.all((fov >= 40) & (fov <= 70))
    # One azimuth per 45-degree stratum.
    strata = torch.floor((cams.azimuth + 180) / 45).long()
    assert sorted(strata.tolist()) == list(range(8))
    assert torch.allclose(cams.position.norm(dim=-1), cams.distance, atol=1e-5)
    again = sample_cameras(cfg, 8, torch.Generator().manual_seed(0))
    assert torch.equal(again.c2w, cams.c2w)


def test_orbit_starts_at_front():
    cams = orbit_cameras(4, elevation=0.0, distance=2.0)
    assert torch.allclose(cams.azimuth, torch.tensor([0.0, 90.0, -180.0, -90.0]))
