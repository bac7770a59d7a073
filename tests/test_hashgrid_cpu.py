"""The fused CPU hash grid (field/hashgrid_cpu.py): the same features and table gradient as the
PyTorch encoding it replaces, the same at any thread count, normals routed to the PyTorch path, and
a clean fall-back (for the occupancy kernel too) where no C compiler builds it."""
from __future__ import annotations

import pytest
import torch

from steindreamer.backends import hashgrid_backend
from steindreamer.field import hashgrid_cpu
from steindreamer.field.hashgrid import HashGridConfig, make_hashgrid

from hashgrids import CFG, encode_both, fused_node, pair, points

needs_kernel = pytest.mark.skipif(hashgrid_cpu.library() is None, reason="no C compiler builds the fused hash grid here")

@needs_kernel
@pytest.mark.parametrize("features", [2, 3])
def test_fused_kernel_matches_the_torch_encoding_and_its_table_gradient(features):
    torch_path, fused = pair(features=features)
    assert torch_path.hashed.tolist() == [False, False, True, True, True]
    x = points(3000)
    ref_out, fused_out = encode_both(torch_path, fused, x)
    assert torch.allclose(fused_out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fused.table.grad, torch_path.table.grad, atol=1e-4, rtol=1e-5)
    assert fused.table.grad.abs().sum() > 0
    # The function behind it is the one autograd runs: not the PyTorch path in disguise.
    node = fused_node(fused, x)
    assert node is not None
    assert node.kernel is hashgrid_cpu


@needs_kernel
def test_non_finite_points_stay_inside_the_table():
    """A NaN or infinite point (a diverged field's surface point) reads the grid's corner, never
    memory outside the table."""
    torch_path, fused = pair()
    bad = torch.tensor([[float("nan"), 0.1, 0.2], [float("inf"), -float("inf"), 0.0], [1e30, -1e30, float("nan")]])
    with torch.no_grad():
        out = fused(bad)
        clamped = torch_path(torch.tensor([[-0.8, 0.1, 0.2], [0.8, -0.8, 0.0], [0.8, -0.8, -0.8]]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, clamped, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("features", [2, 3])
def test_fused_kernel_gives_bit_identical_results_at_any_thread_count(features):
    _, fused = pair(features=features)
    x = points(2000, seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            fused.table.grad = None
            y = fused(x)
            y.square().sum().backward()
            results.append((y.detach(), fused.table.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for y, g in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(g, results[0][1])


@needs_kernel
def test_points_that_need_gradients_take_the_torch_path_and_differentiate_twice():
    torch_path, fused = pair()
    x = points(50, seed=4).requires_grad_(True)
    grads = []
    for enc in (torch_path, fused):
        gx = torch.autograd.grad(enc(x).sum(), x, create_graph=True)[0]  # as normals do
        gx.square().sum().backward()
        grads.append((gx.detach(), enc.table.grad))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])
    assert grads[1][1].abs().sum() > 0
    with torch.no_grad():  # float64 is not the kernel's: the PyTorch path serves it
        assert torch.allclose(fused.double()(x.double()), torch_path.double()(x.double()))


@needs_kernel
def test_cpu_picks_the_kernel_unless_told_otherwise(monkeypatch):
    assert hashgrid_backend("cpu", cpu_kernel=hashgrid_cpu.library) == "cpu"
    assert make_hashgrid(CFG, 1.0, "cpu").kernel == "cpu"
    assert make_hashgrid(HashGridConfig(backend="torch"), 1.0, "cpu").kernel == "torch"
    monkeypatch.setenv("STEINDREAMER_BACKEND", "torch")
    assert hashgrid_backend("cpu", cpu_kernel=hashgrid_cpu.library) == "torch"


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_the_torch_paths_run(compiler, monkeypatch, tmp_path):
    """No compiler, or one that fails: 'auto' falls back to PyTorch (hash grid and occupancy
    lookup); asking for the 'cpu' hash grid is an error."""
    from steindreamer import native
    from steindreamer.backends import occupancy_backend
    from steindreamer.render import occupancy

    caches = (native.load, hashgrid_cpu.library, occupancy.library)
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built earlier to reuse
    for cache in caches:
        cache.cache_clear()
    try:
        assert hashgrid_cpu.library() is None and occupancy.library() is None
        assert hashgrid_backend("cpu", cpu_kernel=hashgrid_cpu.library) == "torch"
        assert occupancy_backend("cpu", cpu_kernel=occupancy.library) == "torch"
        assert make_hashgrid(CFG, 1.0, "cpu").kernel == "torch"
        with pytest.raises(RuntimeError, match="C kernel"):
            hashgrid_backend("cpu", "cpu", cpu_kernel=hashgrid_cpu.library)
        grid = occupancy.OccupancyGrid(occupancy.OccupancyConfig(resolution=8), 1.0)
        assert grid.select(torch.zeros(5, 3)).tolist() == [0, 1, 2, 3, 4]  # the PyTorch path answers
    finally:
        for cache in caches:
            cache.cache_clear()
