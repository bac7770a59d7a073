"""Surface extraction from analytic densities."""
import numpy as np
import pytest
import torch
import trimesh

from steindreamer.export.extract import ExtractionError, auto_threshold, extract_mesh


def ball(center=(0.0, 0.0, 0.0), radius=0.5, width=0.002, peak=50.0):
    """A smooth step density: `peak` inside, 0 outside, level peak/2 exactly at `radius`."""
    c = torch.tensor(center)

    def density(p):
        return peak * torch.sigmoid((radius - (p - c).norm(dim=-1)) / width)

    return density


def radii(v, center=(0.0, 0.0, 0.0)):
    return np.linalg.norm(v - np.asarray(center), axis=1)


def test_sphere_radius_watertight_and_outward():
    v, f, info = extract_mesh(ball(radius=0.5), bound=1.0, resolution=96, threshold=25.0)
    r = radii(v)
    assert abs(r.mean() - 0.5) < 0.01 * 0.5 and r.min() > 0.49 and r.max() < 0.51
    mesh = trimesh.Trimesh(v, f, process=False)
    assert mesh.is_watertight and info["watertight"]
    # Outward: every face normal points away from the centre, the enclosed volume is positive.
    centroids = v[f].mean(1)
    assert (np.einsum("ij,ij->i", mesh.face_normals, centroids) > 0).all()
    assert abs(mesh.volume - 4 / 3 * np.pi * 0.5**3) < 0.02 * 4 / 3 * np.pi * 0.5**3
    assert v.dtype == np.float32 and f.dtype == np.int64
    assert info["threshold"] == 25.0 and info["threshold_rule"] == "given"
    assert info["density_min"] >= 0 and info["density_max"] == pytest.approx(50.0, rel=1e-3)


def test_automatic_threshold_and_coarse_box():
    v, f, info = extract_mesh(ball(center=(0.3, -0.2, 0.1), radius=0.35), bound=1.0, resolution=80)
    assert info["threshold_rule"].startswith("auto")
    assert 0.5 < info["threshold"] < 49.5  # between the two levels of the density
    r = radii(v, (0.3, -0.2, 0.1))
    assert abs(r.mean() - 0.35) < 0.02 * 0.35
    assert trimesh.Trimesh(v, f, process=False).is_watertight
    # The fine grid covers only the occupied box (plus padding), not the whole [-1, 1]^3.
    lo, hi = np.array(info["box_min"]), np.array(info["box_max"])
    assert (lo > np.array([0.3, -0.2, 0.1]) - 0.35 - 0.1).all() and (hi < np.array([0.3, -0.2, 0.1]) + 0.35 + 0.1).all()
    assert info["voxel_size"] < 2.0 / 80 / 2  # finer than spreading 80 samples over the whole bound


def test_axes_are_not_permuted():
    def ellipsoid(p):
        r = ((p[:, 0] / 0.8) ** 2 + (p[:, 1] / 0.5) ** 2 + (p[:, 2] / 0.3) ** 2).sqrt()
        return 10 * torch.sigmoid((1 - r) / 0.002)

    v, _, _ = extract_mesh(ellipsoid, 1.0, 96, threshold=5.0)
    np.testing.assert_allclose(v.max(0), [0.8, 0.5, 0.3], atol=0.02)
    np.testing.assert_allclose(v.min(0), [-0.8, -0.5, -0.3], atol=0.02)


def test_hollow_shell_normals_point_away_from_matter():
    def shell(p):
        r = p.norm(dim=-1)
        return 20 * torch.sigmoid((0.6 - r) / 0.003) * torch.sigmoid((r - 0.3) / 0.003)

    v, f, info = extract_mesh(shell, 1.0, 96, threshold=10.0)
    mesh = trimesh.Trimesh(v, f, process=False)
    centroids = v[f].mean(1)
    outward = np.einsum("ij,ij->i", mesh.face_normals, centroids) > 0
    outer = np.linalg.norm(centroids, axis=1) > 0.45
    assert outer.any() and (~outer).any()
    assert outward[outer].all() and (~outward[~outer]).all()  # the cavity's walls face into the cavity
    assert info["components"] == 2 and info["components_kept"] == 2


def test_small_floaters_are_dropped():
    big, small = ball(radius=0.5), ball(center=(0.8, 0.8, 0.8), radius=0.08)

    def scene(p):
        return torch.maximum(big(p), small(p))

    v, f, info = extract_mesh(scene, 1.0, 96, threshold=25.0)
    assert info["components"] == 2 and info["components_kept"] == 1
    assert radii(v).max() < 0.51
    v2, _, info2 = extract_mesh(scene, 1.0, 96, threshold=25.0, min_component_fraction=0.0)
    assert info2["components_kept"] == 2 and radii(v2).max() > 1.0


def test_decimation_reaches_target_and_keeps_shape():
    v, f, info = extract_mesh(ball(radius=0.5), 1.0, 96, threshold=25.0, target_faces=2000)
    assert info["decimated"] and len(f) <= 2000 and len(f) > 1500
    assert info["faces_marching_cubes"] > 10000
    r = radii(v)
    assert abs(r.mean() - 0.5) < 0.01 and r.min() > 0.47
    mesh = trimesh.Trimesh(v, f, process=False)
    assert mesh.volume > 0 and mesh.is_watertight


def test_empty_density_raises_one_line_error():
    with pytest.raises(ExtractionError) as err:
        extract_mesh(lambda p: torch.zeros(p.shape[0]), 1.0, 48)
    msg = str(err.value)
    assert "\n" not in msg and "threshold" in msg and "density range seen [0, 0]" in msg
    assert isinstance(err.value, ValueError)


def test_threshold_above_every_density_raises():
    with pytest.raises(ExtractionError) as err:
        extract_mesh(ball(peak=50.0), 1.0, 48, threshold=80.0)
    msg = str(err.value)
    assert "\n" not in msg and "threshold 80" in msg and "[0, 50]" in msg


def test_density_above_threshold_everywhere_gives_the_clipped_box():
    # The grid is padded below the threshold, so a field full everywhere still closes at the bound.
    v, f, _ = extract_mesh(lambda p: torch.ones(p.shape[0]), 0.5, 24, threshold=0.5)
    mesh = trimesh.Trimesh(v, f, process=False)
    assert mesh.is_watertight and mesh.volume > 0
    np.testing.assert_allclose(np.abs(v).max(0), 0.5, atol=0.03)


def test_auto_threshold_rules():
    d = np.concatenate([np.full(1000, 0.01), np.full(100, 40.0), [5000.0]])
    t = auto_threshold(d)
    assert 0.01 < t < 40.0  # one very dense voxel does not drag the threshold into the matter
    assert auto_threshold(d, "mean") == pytest.approx(d[d > 1e-5].mean())
    assert np.isnan(auto_threshold(np.zeros(10)))
