"""Shared by the fused hash-grid tests (test_hashgrid_cpu, test_hashgrid_cuda): a small grid, a
PyTorch encoding paired with a fused one on the same random table, and test points."""
from __future__ import annotations

import dataclasses

import torch

from steindreamer.field.hashgrid import HashGridConfig, HashGridEncoding

# Dense levels, hashed levels and one at 2048 (products that wrap 32 bits); 3 features per level
# (the C kernel's general loop; 2 has its own).
CFG = HashGridConfig(levels=5, features=3, log2_table=12, base_res=3, max_res=2048)


def pair(features: int = 3, kernel: str = "cpu", device: str = "cpu", bound: float = 0.8) -> tuple[HashGridEncoding, HashGridEncoding]:
    """A PyTorch encoding and one with the fused `kernel`, with the same random table, on `device`."""
    cfg = dataclasses.replace(CFG, features=features)
    torch_path, fused = HashGridEncoding(cfg, bound).to(device), HashGridEncoding(cfg, bound, kernel=kernel).to(device)
    with torch.no_grad():
        torch_path.table.copy_(torch.randn(torch_path.table.shape, generator=torch.Generator().manual_seed(1)))
        fused.table.copy_(torch_path.table)
    return torch_path, fused


def points(n: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Random points in and beyond the grid's cube (outside it the encoding clamps), plus its corners."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[0.8, 0.8, 0.8], [-0.8, -0.8, -0.8], [0.8, -0.8, 0.0]])
    return torch.cat([torch.rand(n, 3, generator=g) * 2.0 - 1.0, corners]).to(device)


def encode_both(ref: HashGridEncoding, fused: HashGridEncoding, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encodings' features at x, each backpropagated with the same random gradient (so both
    tables hold their .grad): the features of ref and of fused."""
    grad = torch.randn(x.shape[0], ref.out_dim, generator=torch.Generator().manual_seed(2)).to(x.device)
    outs = []
    for enc in (ref, fused):
        y = enc(x)
        y.backward(grad)
        outs.append(y.detach())
    return outs[0], outs[1]


def fused_node(enc: HashGridEncoding, x: torch.Tensor):
    """The FusedEncodeBackward node autograd runs for enc(x), or None (the PyTorch path ran)."""
    fn = enc(x).grad_fn
    return next((f for f in (fn, *(g for g, _ in fn.next_functions)) if type(f).__name__ == "FusedEncodeBackward"), None)
