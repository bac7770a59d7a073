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

    v, f, info = extract_mesh(shell, 1.0, 96, threshold=10.0, fill_cavities=False)
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


# --- The silhouette-calibrated threshold and cavity filling ---------------------------------------


def radial_density(profile):
    """A spherically symmetric density from a numpy profile of the radius (float64 inside)."""
    return lambda p: torch.from_numpy(profile(p.double().norm(dim=-1).numpy())).float()


def silhouette_radius(profile, bound=1.0):
    """Closest distance to the centre of the ray whose opacity 1 - exp(-integral of density) is 0.5,
    by adaptive quadrature of the profile along the ray's chord through the bound sphere: the radius
    of the solid ball whose silhouettes the density renders (from any view, perspective included)."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    def depth(d):
        return 2 * quad(lambda s: float(profile(np.hypot(d, s))), 0.0, np.sqrt(bound**2 - d * d), limit=400)[0]

    return brentq(lambda d: depth(d) - np.log(2.0), 0.01, 0.99 * bound, xtol=1e-7)


def test_silhouette_rule_puts_the_surface_where_the_density_renders_it_and_otsu_does_not():
    # Dense inside r, an exponential tail of width 0.04 outside: Otsu's level falls in the tail.
    peak, r, width = 5.0, 0.4, 0.04
    profile = lambda rho: peak / (1.0 + np.exp(np.clip((rho - r) / width, -60, 60)))  # noqa: E731
    rho = silhouette_radius(profile)
    assert 0.41 < rho < 0.44  # the rendered edge lies in the tail, outside r
    v, f, info = extract_mesh(radial_density(profile), 1.0, 80)
    mesh = trimesh.Trimesh(v, f, process=False)
    assert info["threshold_rule"].startswith("auto: silhouette") and info["silhouette_iou"] > 0.99
    assert info["threshold"] == pytest.approx(profile(rho), rel=0.02)
    assert radii(v).mean() == pytest.approx(rho, rel=0.005)
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * rho**3, rel=0.02)
    v_otsu, f_otsu, info_otsu = extract_mesh(radial_density(profile), 1.0, 80, threshold="otsu")
    assert info_otsu["threshold_rule"].startswith("auto: Otsu") and info_otsu["silhouette_iou"] is None
    assert trimesh.Trimesh(v_otsu, f_otsu, process=False).volume > 1.15 * 4 / 3 * np.pi * rho**3  # inflated
    assert 0 < info["seconds"]["threshold"] < info["seconds"]["total"]


def test_silhouette_rule_on_a_sharp_ball_keeps_the_surface_off_its_faint_tail():
    # Few rays graze the 0.002-wide edge; most maxima are ~0 (miss) or 50 (hit). The level matches
    # the rendered edge, and does not sit on top of the faint tail's maxima (~1e-3 and below).
    profile = lambda rho: 50.0 / (1.0 + np.exp(np.clip((rho - 0.35) / 0.002, -60, 60)))  # noqa: E731
    rho = silhouette_radius(profile)
    v, f, info = extract_mesh(ball(radius=0.35, width=0.002), 1.0, 80)
    assert info["threshold"] == pytest.approx(profile(rho), rel=0.1) and info["silhouette_iou"] > 0.99
    assert radii(v).mean() == pytest.approx(rho, rel=0.01)  # marching cubes on a near-step: ~1 % off


def test_silhouette_rule_on_a_hard_edge_puts_the_level_between_empty_and_full():
    # Every ray's maximum is exactly 0 or 20: any level in [0, 20) gives the same silhouettes; the
    # rule takes the middle (log1p scale), not 0, which would put the surface on the empty voxels.
    v, f, info = extract_mesh(lambda p: 20.0 * (p.norm(dim=-1) < 0.4).float(), 1.0, 64)
    assert info["threshold"] == pytest.approx(np.expm1(np.log1p(20.0) / 2)) and info["silhouette_iou"] > 0.99
    assert abs(radii(v).mean() - 0.4) < 0.5 * info["voxel_size"]


def test_silhouette_rule_is_deterministic():
    density = radial_density(lambda rho: 8.0 / (1.0 + np.exp(np.clip((rho - 0.45) / 0.03, -60, 60))))
    v1, f1, info1 = extract_mesh(density, 1.0, 48)
    v2, f2, info2 = extract_mesh(density, 1.0, 48)
    assert info1["threshold"] == info2["threshold"] and np.array_equal(v1, v2) and np.array_equal(f1, f2)


def test_nothing_opaque_falls_back_to_otsu_and_says_so():
    # Peak 0.2 over a 0.8 chord: optical depth <= 0.16, no ray reaches opacity 0.5.
    v, f, info = extract_mesh(ball(radius=0.4, width=0.01, peak=0.2), 1.0, 48)
    assert "Otsu" in info["threshold_rule"] and "no ray renders opacity > 0.5" in info["threshold_rule"]
    assert info["threshold"] == extract_mesh(ball(radius=0.4, width=0.01, peak=0.2), 1.0, 48, threshold="otsu")[2]["threshold"]
    assert info["silhouette_iou"] is None


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="bogus"):
        extract_mesh(ball(), 1.0, 24, threshold="bogus")


def hollow_ball(p):
    """A dense shell 0.3 < |x| < 0.5, empty inside and out."""
    r = p.norm(dim=-1)
    return 30 * torch.sigmoid((0.5 - r) / 0.002) * torch.sigmoid((r - 0.3) / 0.002)


def test_cavity_filling_leaves_the_outer_shell_only():
    v, f, info = extract_mesh(hollow_ball, 1.0, 96, threshold=15.0)
    mesh = trimesh.Trimesh(v, f, process=False)
    assert info["components"] == 1 and len(mesh.split(only_watertight=False)) == 1 and mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.5**3, rel=0.01)  # the solid ball's
    assert radii(v).min() > 0.49
    # Filled: the cavity's voxels, i.e. about the inner ball's volume in voxels.
    assert info["cavity_voxels_filled"] * info["voxel_size"] ** 3 == pytest.approx(4 / 3 * np.pi * 0.3**3, rel=0.05)

    v2, f2, info2 = extract_mesh(hollow_ball, 1.0, 96, threshold=15.0, fill_cavities=False)
    mesh2 = trimesh.Trimesh(v2, f2, process=False)
    assert info2["components"] == 2 and info2["cavity_voxels_filled"] == 0
    assert mesh2.volume == pytest.approx(4 / 3 * np.pi * (0.5**3 - 0.3**3), rel=0.01)
    assert len(f) / len(f2) == pytest.approx(1 / (1 + 0.6**2), rel=0.03)  # the inner wall's faces (by area) are gone


def test_cavity_filling_keeps_a_torus_hole_open():
    def torus(p):  # around the Y axis: the vertical line through the centre runs through the hole
        ring = torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - 0.5
        return 30 * torch.sigmoid((0.2 - torch.sqrt(ring**2 + p[:, 1] ** 2)) / 0.002)

    v, f, info = extract_mesh(torus, 1.0, 96, threshold=15.0)
    mesh = trimesh.Trimesh(v, f, process=True)
    assert info["cavity_voxels_filled"] == 0 and mesh.is_watertight
    assert mesh.euler_number == 0  # V - E + F = 2 - 2 genus: one handle
    assert mesh.volume == pytest.approx(2 * np.pi**2 * 0.5 * 0.2**2, rel=0.01)
    assert np.hypot(v[:, 0], v[:, 2]).min() > 0.29  # no surface near the axis: nothing spans the hole


def test_cavity_inside_a_default_extraction_is_filled():
    # The default rule and fill together: the hollow ball's cavity is invisible to the silhouettes.
    v, f, info = extract_mesh(hollow_ball, 1.0, 64)
    assert info["threshold_rule"].startswith("auto: silhouette") and info["cavity_voxels_filled"] > 0
    assert info["components"] == 1 and radii(v).min() > 0.48


def test_config_selects_the_rule_and_cavity_filling():
    from steindreamer.config import load_config
    from steindreamer.errors import UserError
    from steindreamer.export.extract import extract_field_surface

    cfg = load_config("toy", None, ["mesh.threshold_rule=otsu", "mesh.fill_cavities=false", "mesh.grid_resolution=64"])
    assert cfg.mesh.threshold_rule == "otsu" and cfg.mesh.fill_cavities is False
    default = load_config("toy").mesh
    assert (default.threshold_rule, default.fill_cavities, default.threshold) == ("silhouette", True, -1.0)
    with pytest.raises(UserError) as err:
        load_config("toy", None, ["mesh.threshold_rule=bogus"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("invalid config: mesh.threshold_rule") and "silhouette" in msg

    class Field(torch.nn.Module):  # a NeRF field's interface: parameters, cfg.bound, density
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.cfg = type("Cfg", (), {"bound": 1.0})()

        def density(self, x):
            return hollow_ball(x)

    _, _, info = extract_field_surface(Field(), cfg.mesh)
    assert info["threshold_rule"].startswith("auto: Otsu") and info["components"] == 2
    _, _, info = extract_field_surface(Field(), default)
    assert info["threshold_rule"].startswith("auto: silhouette") and info["components"] == 1
