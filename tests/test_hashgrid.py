import dataclasses
import itertools
import os
import shutil

import pytest
import torch

from steindreamer.field.hashgrid import HashGridConfig, HashGridEncoding, level_resolutions


def test_output_shape_and_gradients_reach_table():
    cfg = HashGridConfig(levels=4, features=2, log2_table=10, base_res=4, max_res=32)
    grid = HashGridEncoding(cfg, bound=1.0)
    x = torch.rand(7, 5, 3) * 2 - 1
    y = grid(x)
    assert y.shape == (7, 5, 8)
    y.square().sum().backward()
    assert grid.table.grad is not None and grid.table.grad.abs().sum() > 0
    assert level_resolutions(cfg) == [4, 8, 16, 32]


def test_non_finite_points_read_the_grid_corner_on_the_torch_path():
    """NaN reads the low corner and +-inf the clamped face, as in the fused kernels; with gradients on
    (the normals' path) too, where a NaN once became a negative index (IndexError)."""
    cfg = HashGridConfig(levels=4, features=2, log2_table=10, base_res=4, max_res=64)
    grid = HashGridEncoding(cfg, bound=0.8)
    bad = torch.tensor([[float("nan"), 0.1, 0.2], [float("inf"), -float("inf"), 0.0]], requires_grad=True)
    out = grid(bad)
    with torch.no_grad():
        clamped = grid(torch.tensor([[-0.8, 0.1, 0.2], [0.8, -0.8, 0.0]]))
    assert torch.isfinite(out).all() and torch.equal(out.detach(), clamped)
    (gx,) = torch.autograd.grad(out.sum(), bad)
    assert torch.isfinite(gx).all()


def test_interpolation_is_trilinear_between_vertices():
    cfg = HashGridConfig(levels=1, features=1, log2_table=12, base_res=4, max_res=4)
    grid = HashGridEncoding(cfg, bound=1.0)
    with torch.no_grad():
        grid.table.copy_(torch.randn_like(grid.table))
    # Points on grid vertices read the table entry exactly; the midpoint of an edge averages its two ends.
    v0 = torch.tensor([[1, 2, 3]]) / 4.0 * 2 - 1
    v1 = torch.tensor([[2, 2, 3]]) / 4.0 * 2 - 1
    mid = (v0 + v1) / 2
    f0, f1, fm = grid(v0), grid(v1), grid(mid)
    assert torch.allclose(fm, (f0 + f1) / 2, atol=1e-6)
    row = 1 + 2 * 5 + 3 * 25  # dense index x + y (res+1) + z (res+1)^2
    assert torch.allclose(f0[0], grid.table[row], atol=1e-6)


def hashed_row(vertex: tuple[int, int, int], log2_table: int) -> int:
    """Instant-NGP's spatial hash of an integer grid vertex, in Python integers (uint32 products)."""
    x, y, z = vertex
    return ((x * 1) ^ (y * 2654435761) ^ (z * 805459861)) % 2**32 % 2**log2_table


def test_hash_collision_shares_features_only_in_hashed_levels():
    # Level 0 (res 4, 125 vertices) fits the 256-entry table: dense, no collisions.
    # Level 1 (res 64) does not: hashed, and two distinct vertices can share an entry by design.
    cfg = HashGridConfig(levels=2, features=2, log2_table=8, base_res=4, max_res=64)
    grid = HashGridEncoding(cfg, bound=1.0)
    assert grid.hashed.tolist() == [False, True]
    with torch.no_grad():
        grid.table.copy_(torch.randn_like(grid.table))
    res = 64
    seen = {}
    pair = None
    for v in itertools.product(range(0, res, 4), range(0, res, 4), range(0, res, 16)):
        idx = hashed_row(v, cfg.log2_table)  # level 1's row
        # Vertices on the coarse level's grid too (multiples of 16) would coincide there; avoid them.
        if idx in seen and (v[0] // 16, v[1] // 16, v[2] // 16) != tuple(c // 16 for c in seen[idx]):
            pair = (seen[idx], v)
            break
        seen.setdefault(idx, v)
    assert pair is not None
    a, b = (torch.tensor(p, dtype=torch.float32) / res * 2 - 1 for p in pair)
    fa, fb = grid(a[None])[0], grid(b[None])[0]
    assert torch.allclose(fa[2:], fb[2:], atol=1e-6)  # hashed level: same entry, same feature
    assert not torch.allclose(fa[:2], fb[:2], atol=1e-4)  # dense level: different vertices differ


def test_hash_matches_instant_ngp_uint32_hash_at_large_coordinates():
    """The int32 arithmetic (half the index memory of int64) must give Instant-NGP's uint32 hash,
    also where the products overflow 32 bits."""
    cfg = HashGridConfig(levels=1, features=1, log2_table=12, base_res=2048, max_res=2048)
    grid = HashGridEncoding(cfg, bound=1.0)
    assert grid.hashed.tolist() == [True]
    with torch.no_grad():
        grid.table.copy_(torch.randn_like(grid.table))
    g = torch.Generator().manual_seed(0)
    vertices = torch.randint(1, 2047, (64, 3), generator=g)
    points = vertices.double() / 2048 * 2 - 1
    with torch.no_grad():
        features = grid(points.float())[:, 0]
    for v, f in zip(vertices.tolist(), features):
        row = hashed_row(v, 12)
        assert abs(float(f) - float(grid.table.detach()[row, 0])) < 1e-3, (v, row)


def test_first_and_second_derivatives_match_finite_differences():
    """Normals differentiate the encoding twice (grad wrt points, then wrt the table through it)."""
    cfg = HashGridConfig(levels=3, features=2, log2_table=6, base_res=2, max_res=8)
    grid = HashGridEncoding(cfg, bound=1.0).double()
    assert grid.hashed.tolist() == [False, True, True]
    with torch.no_grad():
        grid.table.copy_(torch.randn_like(grid.table))
    g = torch.Generator().manual_seed(0)
    points = (torch.rand(6, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    table = grid.table.detach().clone().requires_grad_(True)

    def encode(p, t):
        return torch.func.functional_call(grid, {"table": t}, (p,))

    assert torch.autograd.gradcheck(encode, (points, table))
    assert torch.autograd.gradgradcheck(encode, (points, table))


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_encoding_matches_eager_and_normals_stay_eager():
    cfg = HashGridConfig(levels=4, features=2, log2_table=8, base_res=4, max_res=32)
    eager = HashGridEncoding(cfg, bound=1.0)
    compiled = HashGridEncoding(dataclasses.replace(cfg, compile=True), bound=1.0)
    with torch.no_grad():
        eager.table.copy_(torch.randn_like(eager.table))
        compiled.table.copy_(eager.table)
    g = torch.Generator().manual_seed(0)
    for n in (300, 517, 999):  # a new N recompiles once with dynamic shapes; results stay the eager ones
        x = torch.rand(n, 3, generator=g) * 2 - 1
        for enc in (eager, compiled):
            enc.table.grad = None
            enc(x).square().sum().backward()
        assert torch.allclose(compiled(x), eager(x), atol=1e-6)
        assert torch.allclose(compiled.table.grad, eager.table.grad, atol=1e-5)
    # Points that need a gradient (normals) take the eager path, which differentiates twice.
    x = (torch.rand(50, 3, generator=g) * 2 - 1).requires_grad_(True)
    grads = []
    for enc in (eager, compiled):
        enc.table.grad = None
        gx = torch.autograd.grad(enc(x).sum(), x, create_graph=True)[0]
        gx.square().sum().backward()
        grads.append(enc.table.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and grads[0].abs().sum() > 0


def test_compile_is_refused_beside_a_named_fused_kernel_and_flagged_beside_a_picked_one(caplog):
    """field.grid.compile applies to the PyTorch encoding only: with a fused backend named the config
    is refused when checked (before any work); where 'auto' picks a fused kernel it is said to have no
    effect (and the kernel runs)."""
    from steindreamer.config import load_config
    from steindreamer.errors import UserError
    from steindreamer.field import hashgrid_cpu
    from steindreamer.field.hashgrid import make_hashgrid

    cfg = HashGridConfig(levels=2, features=2, log2_table=8, base_res=4, max_res=16, compile=True)
    for backend in ("cpu", "tcnn", "triton"):
        with pytest.raises(UserError, match="compile"):
            dataclasses.replace(cfg, backend=backend).check()
    with pytest.raises(UserError, match="field.grid.compile"):
        load_config(None, None, ["field.grid.compile=true", "field.grid.backend=cpu"])
    assert make_hashgrid(dataclasses.replace(cfg, backend="torch"), 1.0, "cpu").kernel == "torch"
    if hashgrid_cpu.library() is None:
        pytest.skip("no C compiler builds the fused hash grid here: 'auto' takes the PyTorch path, compiled")
    with caplog.at_level("WARNING"):
        assert make_hashgrid(cfg, 1.0, "cpu").kernel == "cpu"
    assert any("no effect" in r.message for r in caplog.records)
