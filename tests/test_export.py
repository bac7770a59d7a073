"""UV baking, mesh files (GLB checked by the Khronos validator), turntables and contact sheets."""
import numpy as np
import pytest
import torch
import trimesh

from steindreamer.export import video
from steindreamer.export.bake import bake_texture, dilate, fill_holes, unwrap
from steindreamer.export.gltf import write_glb, write_obj, write_ply
from steindreamer.export.pipeline import export_textured, turntable_frames
from steindreamer.export.video import contact_sheet, save_contact_sheet, write_turntable

def sphere(subdiv=3, radius=0.5):
    m = trimesh.creation.icosphere(subdiv, radius=radius)
    return np.asarray(m.vertices, dtype=np.float32), np.asarray(m.faces, dtype=np.int64)


def gradient_color(p):
    """A smooth colour that differs in every direction, to catch flipped or swapped UV axes."""
    return torch.stack([p[:, 0] + 0.5, 0.5 + 0.8 * p[:, 1], 0.5 - 0.6 * p[:, 2]], -1).clamp(0, 1)


@pytest.fixture(scope="module")
def unwrapped():
    v, f = sphere()
    vmapping, faces_uv, uvs = unwrap(v, f, texture_size=128)
    return v, f, vmapping, faces_uv, uvs


def test_unwrap_gives_a_consistent_atlas(unwrapped):
    v, f, vmapping, faces_uv, uvs = unwrapped
    assert faces_uv.shape == f.shape and uvs.shape == (len(vmapping), 2)
    assert uvs.min() >= 0 and uvs.max() <= 1
    # Each UV face is the same 3D triangle as the original face.
    np.testing.assert_array_equal(vmapping[faces_uv], f)


def test_constant_colour_bakes_exactly(unwrapped):
    v, f, vmapping, faces_uv, uvs = unwrapped
    rgb = torch.tensor([0.2, 0.6, 0.8])  # x255 lands on integers, away from rounding ties
    const = lambda p: rgb.expand(p.shape[0], 3)  # noqa: E731
    expected = np.round(rgb.numpy() * 255).astype(np.uint8)
    raw, covered = bake_texture(const, v, f, uvs, faces_uv, size=96, dilation=0, fill=False)
    assert 0.3 < covered.mean() < 0.95
    assert (raw[covered] == expected).all()
    assert (raw[~covered] == 0).all()  # nothing written outside the charts before dilation
    full, covered2 = bake_texture(const, v, f, uvs, faces_uv, size=96)
    np.testing.assert_array_equal(covered, covered2)
    assert (full == expected).all()  # dilation + pull-push fill reach every texel


def test_dilation_grows_charts_by_the_requested_width():
    tex = torch.zeros(32, 32, 3)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[10:12, 10:12] = True
    tex[mask] = torch.tensor([1.0, 0.5, 0.25])
    grown_tex, grown = dilate(tex, mask, iterations=3)
    assert grown.sum() == (2 + 6) ** 2 and grown[7:15, 7:15].all()
    torch.testing.assert_close(grown_tex[grown], torch.tensor([1.0, 0.5, 0.25]).expand(int(grown.sum()), 3))
    filled = fill_holes(tex, mask)
    torch.testing.assert_close(filled, torch.tensor([1.0, 0.5, 0.25]).expand(32, 32, 3))


def _glb(folder, unwrapped):
    v, f, vmapping, faces_uv, uvs = unwrapped
    texture, _ = bake_texture(gradient_color, v, f, uvs, faces_uv, size=128)
    return write_glb(folder / "mesh.glb", v[vmapping], faces_uv, uvs, texture)


def test_glb_passes_the_khronos_validator_and_a_cut_one_fails(khronos, tmp_path, unwrapped):
    path = _glb(tmp_path, unwrapped)
    report = khronos(path)
    assert report["numErrors"] == 0, report
    # The validator really checks: the same file cut short fails.
    cut = tmp_path / "cut.glb"
    cut.write_bytes(path.read_bytes()[:-100])
    bad = khronos(cut)
    assert bad["numErrors"] > 0 and bad["errors"], bad


def test_glb_round_trip(tmp_path, unwrapped):
    v, f, vmapping, faces_uv, uvs = unwrapped
    path = _glb(tmp_path, unwrapped)
    assert path == tmp_path / "mesh.glb" and sorted(p.name for p in tmp_path.iterdir()) == ["mesh.glb"]  # no temp files left
    mesh = trimesh.load(path, force="mesh")
    assert len(mesh.vertices) == len(vmapping) and len(mesh.faces) == len(faces_uv)
    np.testing.assert_allclose(mesh.vertices, v[vmapping], atol=1e-6)  # +Y up, no axis swap
    image = mesh.visual.material.baseColorTexture
    assert image is not None and image.size == (128, 128)
    # UVs and texture agree: looking up each vertex's UV gives the colour at its 3D position.
    looked_up = mesh.visual.to_color().vertex_colors[:, :3] / 255.0
    expected = gradient_color(torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))).numpy()
    assert np.abs(looked_up - expected).mean() < 0.01 and np.abs(looked_up - expected).max() < 0.06


def test_obj_mtl_png_round_trip(tmp_path, unwrapped):
    v, f, vmapping, faces_uv, uvs = unwrapped
    texture, _ = bake_texture(gradient_color, v, f, uvs, faces_uv, size=64)
    files = write_obj(tmp_path / "mesh.obj", v[vmapping], faces_uv, uvs, texture)
    assert {p.name for p in files.values()} == {"mesh.obj", "mesh.mtl", "mesh.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.mtl", "mesh.obj", "mesh.png"]
    mesh = trimesh.load(files["obj"], force="mesh", process=False)
    assert len(mesh.faces) == len(faces_uv)
    image = mesh.visual.material.image
    assert image is not None and image.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), texture)
    looked_up = mesh.visual.to_color().vertex_colors[:, :3] / 255.0
    expected = gradient_color(torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))).numpy()
    assert np.abs(looked_up - expected).mean() < 0.02


def test_ply_vertex_colours(tmp_path):
    v, f = sphere(2)
    colors = gradient_color(torch.from_numpy(v)).numpy()
    path = write_ply(tmp_path / "mesh.ply", v, f, colors)
    mesh = trimesh.load(path, process=False)
    assert len(mesh.vertices) == len(v) and len(mesh.faces) == len(f)
    np.testing.assert_allclose(mesh.visual.vertex_colors[:, :3] / 255.0, colors, atol=0.5 / 255 + 1e-6)


def test_export_textured_writes_all_formats(tmp_path):
    v, f = sphere(2)
    result = export_textured(tmp_path, v, f, gradient_color, texture_size=64)
    assert set(result["paths"]) == {"glb", "obj", "ply"}
    assert {p.name for p in tmp_path.iterdir()} == {"mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png", "mesh.ply"}
    assert 0.2 < result["texture_coverage"] < 1.0
    glb = trimesh.load(result["paths"]["glb"], force="mesh")
    normals = np.asarray(glb.vertex_normals)
    radial = np.asarray(glb.vertices) / np.linalg.norm(glb.vertices, axis=1, keepdims=True)
    assert (np.einsum("ij,ij->i", normals, radial) > 0.95).all()  # smooth outward normals, no seams


def test_export_textured_glb_validates(khronos, tmp_path):
    v, f = sphere(2)
    assert khronos(export_textured(tmp_path, v, f, gradient_color, texture_size=64, formats=("glb",))["paths"]["glb"])["numErrors"] == 0


def test_turntable_mp4_and_gif_fallback(tmp_path, monkeypatch):
    import imageio.v3 as iio

    v, f = sphere(2)
    frames = turntable_frames(v, f, gradient_color, n_frames=6, size=33)  # odd size: padded for H.264
    assert len(frames) == 6 and frames[0].shape == (33, 33, 3) and frames[0].dtype == np.uint8
    assert not np.array_equal(frames[0], frames[1])  # it turns
    assert (frames[0][0, 0] == 255).all() and (frames[0][16, 16] != 255).any()  # white background, object in the middle
    path = write_turntable(frames, tmp_path / "turntable.mp4", fps=6)
    assert path.suffix == ".mp4"
    read = list(iio.imiter(path))
    assert len(read) == 6 and read[0].shape[:2] == (34, 34)

    def broken(*args, **kwargs):
        raise OSError("ffmpeg is broken")

    monkeypatch.setattr(video, "_write_mp4", broken)
    gif = write_turntable(frames, tmp_path / "fallback.mp4", fps=6)
    assert gif == tmp_path / "fallback.gif" and not (tmp_path / "fallback.mp4").exists()
    assert len(list(iio.imiter(gif))) == 6


def test_contact_sheet(tmp_path):
    frames = [np.full((4, 5, 3), k * 20, dtype=np.uint8) for k in range(5)]
    sheet = contact_sheet(frames, cols=3)
    assert sheet.shape == (2 * 4 + 2, 3 * 5 + 2 * 2, 3)
    assert (sheet[:4, :5] == 0).all() and (sheet[6:10, 7:12] == 80).all() and (sheet[6:, 14:] == 255).all()
    path = save_contact_sheet(frames, tmp_path / "sheet.png", cols=3)
    np.testing.assert_array_equal(np.asarray(__import__("PIL.Image").Image.open(path).convert("RGB")), sheet)


def _broken_mesh():
    """A sphere plus what a trained mesh can hold: a face with a repeated corner, a zero-area face on
    three collinear vertices, an unused vertex, and a fin (one triangle twice, opposite windings:
    its vertices' area-weighted normals cancel to zero length)."""
    v, f = sphere(1)
    n = len(v)
    extra = np.array([[2, 0, 0], [2.1, 0, 0], [2.2, 0, 0], [9, 9, 9], [0, 2, 0], [0, 2.2, 0], [0.2, 2, 0]], dtype=np.float32)
    faces = np.concatenate([f, [[0, 0, 1], [n, n + 1, n + 2], [n + 4, n + 5, n + 6], [n + 4, n + 6, n + 5]]])
    return np.concatenate([v, extra]), faces, len(f)


def test_export_repairs_degenerate_faces_unused_vertices_and_zero_normals(tmp_path):
    from steindreamer.export.bake import vertex_normals

    v, f, good = _broken_mesh()
    assert (np.linalg.norm(vertex_normals(v, f)[len(v) - 3:], axis=1) > 0.99).all()  # the fin: unit normals
    result = export_textured(tmp_path, v, f, gradient_color, texture_size=64, formats=("glb", "ply"))
    assert result["removed"] == {"degenerate_faces": 2, "unreferenced_vertices": 4}
    glb = trimesh.load(result["paths"]["glb"], force="mesh", process=False)
    assert len(glb.faces) == good + 2
    assert np.allclose(np.linalg.norm(glb.vertex_normals, axis=1), 1.0, atol=1e-5)
    ply = trimesh.load(result["paths"]["ply"], process=False)
    assert len(ply.vertices) == len(v) - 7 + 3 and len(ply.faces) == good + 2


def test_export_of_a_broken_mesh_validates(khronos, tmp_path):
    v, f, _ = _broken_mesh()
    report = khronos(export_textured(tmp_path, v, f, gradient_color, texture_size=64, formats=("glb",))["paths"]["glb"])
    assert report["numErrors"] == 0, report
