"""The CUDA hash-grid backends against the PyTorch encoding. They run where CUDA and the library
are present (a GPU machine) and skip elsewhere: the Triton kernel (field/hashgrid_triton.py) must
give the PyTorch path's features and table gradient; tinycudann (its own hash and vertex
placement, so not the same numbers) must fit what the PyTorch grid fits."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from steindreamer.backends import hashgrid_backend
from steindreamer.field import hashgrid_cpu, hashgrid_triton
from steindreamer.field.hashgrid import HashGridConfig, make_hashgrid

from hashgrids import CFG, encode_both, fused_node, pair, points


def _reason(library: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    try:
        __import__(library)
    except Exception as err:  # noqa: BLE001
        return f"{library} not importable ({type(err).__name__})"
    return None


needs_triton = pytest.mark.skipif(_reason("triton") is not None, reason=f"Triton hash grid: {_reason('triton')}")
needs_tcnn = pytest.mark.skipif(_reason("tinycudann") is not None, reason=f"tinycudann hash grid: {_reason('tinycudann')}")

@needs_triton
@pytest.mark.parametrize("features", [2, 3])
@pytest.mark.parametrize("n", [1000, 70_001])
def test_triton_kernel_matches_the_torch_encoding_and_its_table_gradient(features, n):
    ref, fast = pair(features, "triton", "cuda")
    x = points(n, device="cuda")
    ref_out, fast_out = encode_both(ref, fast, x)
    assert torch.allclose(fast_out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fast.table.grad, ref.table.grad, atol=1e-3, rtol=1e-4)  # atomic adds: any order
    assert fast.table.grad.abs().sum() > 0
    node = fused_node(fast, x)
    assert node is not None
    assert node.kernel is hashgrid_triton  # the Triton kernel is what autograd runs


@needs_triton
def test_triton_kernel_keeps_non_finite_points_inside_the_table():
    ref, fast = pair(2, "triton", "cuda")
    bad = torch.tensor([[float("nan"), 0.1, 0.2], [float("inf"), -float("inf"), 0.0]]).cuda()
    with torch.no_grad():
        out = fast(bad)
        clamped = ref(torch.tensor([[-0.8, 0.1, 0.2], [0.8, -0.8, 0.0]]).cuda())
    assert torch.isfinite(out).all() and torch.allclose(out, clamped, atol=1e-5)


@needs_triton
def test_cuda_picks_the_triton_kernel_and_normals_take_the_torch_path():
    if _reason("tinycudann") is None:
        pytest.skip("tinycudann present: 'auto' picks it")
    assert hashgrid_backend("cuda", cpu_kernel=hashgrid_cpu.library) == "triton"
    assert make_hashgrid(CFG, 1.0, "cuda").kernel == "triton"
    _, fast = pair(2, "triton", "cuda")
    x = points(500, device="cuda")
    # Fixed points (rendering): the Triton kernel is what autograd runs.
    node = fused_node(fast, x)
    assert node is not None and node.kernel is hashgrid_triton
    g = torch.randn(x.shape[0], fast.out_dim, generator=torch.Generator().manual_seed(3)).cuda()
    y_kernel = fast(x)
    y_kernel.backward(g)
    table_grad_kernel, fast.table.grad = fast.table.grad.clone(), None
    # Points that need a gradient (normals): no fused node, so the PyTorch path ran; its features and
    # table gradient (for the same output gradient) are the kernel's, and it differentiates twice.
    xg = x.clone().requires_grad_(True)
    assert fused_node(fast, xg) is None
    y_torch = fast(xg)
    assert torch.allclose(y_torch.detach(), y_kernel.detach(), atol=1e-5, rtol=1e-5)
    (y_torch * g).sum().backward(retain_graph=True)
    assert torch.allclose(fast.table.grad, table_grad_kernel, atol=1e-3, rtol=1e-4)
    fast.table.grad = None
    gx = torch.autograd.grad(y_torch.square().sum(), xg, create_graph=True)[0]
    gx.square().sum().backward()
    assert gx.abs().sum() > 0 and fast.table.grad.abs().sum() > 0


@needs_tcnn
def test_tcnn_encoding_fits_what_the_torch_encoding_fits():
    """tinycudann hashes and places vertices its own way, so the same table gives other numbers:
    both backends must fit the same smooth field equally well through the same small MLP."""
    target = lambda p: torch.sin(3 * p[:, :1]) * torch.cos(2 * p[:, 1:2]) + p[:, 2:]  # noqa: E731
    cfg = HashGridConfig(levels=8, features=2, log2_table=14, base_res=4, max_res=128)
    losses = {}
    for backend in ("torch", "tcnn"):
        torch.manual_seed(0)
        enc = make_hashgrid(dataclasses.replace(cfg, backend=backend), 1.0, "cuda").cuda()
        head = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).cuda()
        opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
        g = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(300):
            p = torch.rand(4096, 3, device="cuda", generator=g) * 2 - 1
            loss = (head(enc(p)) - target(p)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[backend] = float(loss)
    assert losses["torch"] < 0.01 and losses["tcnn"] < 2 * losses["torch"] + 1e-3, losses
