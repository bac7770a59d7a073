"""The 3D shape check on meshes whose answer is known: exact primitives (plain, turned, moved and
noisy) must be classified as themselves; a cube averaged over yaw (the failure SDS produced) and
other look-alikes must not pass as a cube."""
import numpy as np
import pytest
import torch

from steindreamer.toy import shape3d as S
from steindreamer.toy.world import SDFS, SHAPES, turn

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_primitive_is_itself_with_full_iou(shape):
    r = S.check_mesh(S.primitive_mesh(shape), "red", shape)
    assert r["shape"] == shape and r["shape_right"]
    assert r["volumetric_iou"] > 0.95
    assert r["chamfer"] < 0.01 and r["normal_consistency"] > 0.95
    assert r["colour"] is None and not r["right"]  # no texture: colour cannot be right


@pytest.mark.parametrize("shape", SHAPES)
def test_turned_scaled_moved_noisy_primitive_is_still_itself(shape):
    mesh = S.primitive_mesh(shape, yaw=30.0, scale=0.85, offset=(0.04, -0.03, 0.02), noise=0.003, seed=1)
    r = S.check_mesh(mesh, "red", shape)
    assert r["shape"] == shape, r["shape_fit"]
    assert r["volumetric_iou"] < 0.9  # in the world's frame the moved copy no longer coincides


def _mesh_of_occupancy(occ: np.ndarray):
    import mcubes
    import trimesh

    v, f = mcubes.marching_cubes(mcubes.smooth(occ), 0.0)
    n = occ.shape[0]
    v = -S.EXTENT + (v + 0.5) * (2 * S.EXTENT / n)
    return trimesh.Trimesh(v, f[:, ::-1], process=False)


def test_cube_averaged_over_yaw_is_not_a_cube():
    pts = S.grid_points(96)
    with torch.no_grad():
        mean = sum((SDFS["cube"](turn(pts, float(a))) < 0).float() for a in range(0, 90, 5)) / 18
    blob = _mesh_of_occupancy((mean >= 0.5).numpy())
    r = S.check_mesh(blob, "red", "cube")
    assert r["shape"] == "cylinder" and not r["shape_right"]
    assert r["features"]["axis_facing_share"] < S.CUBE_FACES_SHARE  # its sides are round


def test_features_tell_hole_apex_faces_and_bottom():
    f = {s: S.check_mesh(S.primitive_mesh(s), "red", s)["features"] for s in SHAPES}
    assert f["torus"]["hole_open"] and not any(f[s]["hole_open"] for s in SHAPES if s != "torus")
    assert f["cube"]["axis_facing_share"] >= S.CUBE_FACES_SHARE
    assert all(f[s]["axis_facing_share"] < S.CUBE_FACES_SHARE for s in SHAPES if s != "cube")
    assert f["cone"]["apex_ratio"] < 0.15 and f["pyramid"]["apex_ratio"] < 0.15 and f["cube"]["apex_ratio"] > 0.9
    assert f["cube"]["bottom_ratio"] > 0.9 and f["sphere"]["bottom_ratio"] < 0.3


def test_voxelise_tolerates_a_hole_in_the_surface():
    mesh = S.primitive_mesh("sphere", resolution=48)
    keep = np.ones(len(mesh.faces), bool)
    keep[np.argsort(mesh.triangles_center[:, 1])[-3:]] = False  # punch three faces out at the top
    occ = S.voxelise(mesh.vertices, mesh.faces[keep])
    truth = S.true_occupancy("sphere")
    assert (occ & truth).sum() / (occ | truth).sum() > 0.95


def test_textured_glb_colour_is_read_from_the_texture(tmp_path):
    from steindreamer.export.gltf import write_glb

    mesh = S.primitive_mesh("cylinder", resolution=48)
    uv = np.full((len(mesh.vertices), 2), 0.5)
    tex = np.zeros((8, 8, 3), np.uint8)
    tex[:] = (25, 51, 229)  # the palette's blue
    path = write_glb(tmp_path / "a.glb", mesh.vertices, mesh.faces, uv, tex)
    r = S.check_glb(path, "a blue cylinder")
    assert r["colour"] == "blue" and r["colour_error"] < 0.02 and r["right"]
    assert not S.check_glb(path, "a red cylinder")["right"]
