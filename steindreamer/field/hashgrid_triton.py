"""The hash-grid encoding fused for CUDA GPUs in Triton: `hashgrid.encode`'s forward and its table
gradient in one kernel (a compile-time switch picks which), the GPU counterpart of `hashgrid_cpu`.
The PyTorch path materialises [8 corners, L levels, N] index and weight tensors (at a 512x512
render, millions of samples, tens of GiB of traffic); here a program takes a block of points at one
level and keeps its 8 corners in registers. Programs of one level run together, so that level's
table stays in L2.

Used where Triton imports and tinycudann does not (picked in `steindreamer.backends`). Only the
table gets a gradient: rendering holds sample points fixed; normals differentiate through the points
twice and take the PyTorch path (HashGridEncoding.forward routes them). The backward accumulates
with atomic adds, so its sums are not bit-reproducible run to run (as tinycudann's are not).
"""
from __future__ import annotations

from .hashgrid import _PRIMES32

BLOCK = 256  # points per program

try:  # optional: only imported where the backend picker chose this module (CUDA and Triton present)
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "not available"
    triton = None

# _PRIMES32 written out: Triton kernels take integer literals, not Python globals.
assert _PRIMES32 == (1, -1640531535, 805459861)


if triton is not None:

    @triton.jit
    def _corner(px, py, pz, res_f, res_max, res1, offset, hashed, mask, corner: tl.constexpr):
        """Table row and trilinear weight of one of a point's 8 corners (bit 0: x, 1: y, 2: z)."""
        # ((x / bound) * 0.5 + 0.5) was applied by the caller; NaN goes to 0 as in the C kernel.
        bx = tl.minimum(tl.floor(px * res_f).to(tl.int32), res_max)
        by = tl.minimum(tl.floor(py * res_f).to(tl.int32), res_max)
        bz = tl.minimum(tl.floor(pz * res_f).to(tl.int32), res_max)
        fx = px * res_f - bx.to(tl.float32)
        fy = py * res_f - by.to(tl.float32)
        fz = pz * res_f - bz.to(tl.float32)
        cx = bx + (corner & 1)
        cy = by + ((corner >> 1) & 1)
        cz = bz + ((corner >> 2) & 1)
        wx = fx if (corner & 1) else 1.0 - fx
        wy = fy if ((corner >> 1) & 1) else 1.0 - fy
        wz = fz if ((corner >> 2) & 1) else 1.0 - fz
        # int32 products wrap modulo 2^32, as Instant-NGP's uint32 hash (primes as int32 bit patterns).
        h = (cx ^ (cy * -1640531535) ^ (cz * 805459861)) & mask
        dense = cx + cy * res1 + cz * res1 * res1
        row = tl.where(hashed != 0, h, dense) + offset
        return row.to(tl.int64), wx * wy * wz

    @triton.jit
    def _unit(ptr, idx, m, axis: tl.constexpr, bound):
        # The same operations, in the same order, as hashgrid.encode: fine levels magnify rounding.
        u = (tl.load(ptr + idx * 3 + axis, mask=m, other=0.0) / bound) * 0.5 + 0.5
        u = tl.where(u == u, u, 0.0)  # NaN -> 0
        return tl.minimum(tl.maximum(u, 0.0), 1.0)

    @triton.jit
    def _kernel(x_ptr, data_ptr, target_ptr, res_f_ptr, res_max_ptr, res1_ptr, off_ptr, hashed_ptr, n, bound, mask,
                LF: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
        # Forward (data: table, target: out [N, L*F]) or table gradient (data: grad [N, L*F],
        # target: dtable, atomic adds) of BLOCK points at level program_id(1).
        level = tl.program_id(1)
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = idx < n
        px, py, pz = _unit(x_ptr, idx, m, 0, bound), _unit(x_ptr, idx, m, 1, bound), _unit(x_ptr, idx, m, 2, bound)
        res_f, res_max = tl.load(res_f_ptr + level), tl.load(res_max_ptr + level)
        res1, offset, hashed = tl.load(res1_ptr + level), tl.load(off_ptr + level), tl.load(hashed_ptr + level)
        for f in tl.static_range(F):
            if BACKWARD:
                g = tl.load(data_ptr + idx * LF + level * F + f, mask=m, other=0.0)
                for corner in tl.static_range(8):
                    row, w = _corner(px, py, pz, res_f, res_max, res1, offset, hashed, mask, corner)
                    tl.atomic_add(target_ptr + row * F + f, w * g, mask=m, sem="relaxed")
            else:
                acc = tl.zeros([BLOCK], dtype=tl.float32)
                for corner in tl.static_range(8):
                    row, w = _corner(px, py, pz, res_f, res_max, res1, offset, hashed, mask, corner)
                    acc += w * tl.load(data_ptr + row * F + f, mask=m, other=0.0)
                tl.store(target_ptr + idx * LF + level * F + f, acc, mask=m)


def _launch(x, data, target, enc, backward: bool) -> None:
    levels, feats = enc.res_f.shape[0], enc.table.shape[1]
    grid = ((x.shape[0] + BLOCK - 1) // BLOCK, levels)
    _kernel[grid](x, data, target, enc.res_f, enc.res_max, enc.res1, enc.offsets, enc.hashed, x.shape[0],
                  float(enc.bound), 2**enc.cfg.log2_table - 1, LF=levels * feats, F=feats, BLOCK=BLOCK,
                  BACKWARD=backward, enable_fp_fusion=False)  # no fused multiply-adds: the PyTorch path rounds each op


def forward(x, table, out, enc) -> None:
    """out [N, L * F] = the encoding of points x [N, 3] by HashGridEncoding `enc` with `table`
    (float32, contiguous, CUDA; called by hashgrid.FusedEncode)."""
    _launch(x, table, out, enc, backward=False)


def backward(x, grad, dtable, enc) -> None:
    """dtable += the table gradient of grad [N, L * F] at points x (atomic adds)."""
    _launch(x, grad, dtable, enc, backward=True)
