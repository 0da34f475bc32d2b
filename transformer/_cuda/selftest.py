"""Fakes of the self-test ops (csrc/selftest/), so even the test ops trace under torch.compile, and hopper_check:
the sm_90a self-tests run against torch on a GPU (the hardware check of the sm_90a attention forward)."""
from __future__ import annotations

import torch


def register(ns: str):
    @torch.library.register_fake(f"{ns}::selftest_mma")
    def _mma_fake(a, b, c, a_trans, b_trans, variant, skip_wait):
        return c.new_empty((16, 8))

    @torch.library.register_fake(f"{ns}::selftest_warp_ops")
    def _warp_fake(x, width):
        return x.new_empty((x.shape[0], 10))


def tma_box_4d(x, x0, y0, h0, b0, rows, cols):
    """The box [rows][cols] a 4-D TMA load reads at (column x0, row y0, head h0, batch b0) of x [B, N, H, D]:
    elements outside x are 0."""
    box = torch.zeros(rows, cols, dtype=x.dtype)
    if not (0 <= h0 < x.shape[2] and 0 <= b0 < x.shape[0]):
        return box
    r0, r1, c0, c1 = max(y0, 0), min(y0 + rows, x.shape[1]), max(x0, 0), min(x0 + cols, x.shape[3])
    if r0 < r1 and c0 < c1:
        box[r0 - y0:r1 - y0, c0 - x0:c1 - x0] = x[b0, r0:r1, h0, c0:c1].cpu()
    return box


def hopper_check(ns, device) -> str:
    """Run the sm_90a self-test kernels (csrc/selftest/hopper.cuh) of op namespace `ns` on `device` against torch:
    wgmma with A from shared memory and from registers, B K-major and N-major, N 64 / 128 / 256, fp16 / bf16,
    128-byte swizzled tiles loaded by TMA (the forms and layouts the sm_90a attention forward uses), a TMA load / store
    round trip, 4-D TMA loads over a strided [B][N][H][D] view with out-of-bounds rows and columns (the forward's
    Q / K / V maps) and the mbarrier producer / consumer ring. "" if all agree, else what failed."""
    g = torch.Generator().manual_seed(0)
    fails = []
    for dtype in (torch.float16, torch.bfloat16):
        for n, a_regs, b_mn in ((128, False, False), (64, False, False), (64, True, True), (128, True, True),
                                (256, True, True)):
            k = 64
            a = torch.randn(64, k, generator=g).to(dtype)
            b = torch.randn(k, n, generator=g).to(dtype)
            c = torch.randn(64, n, generator=g)
            b_in = b.contiguous() if b_mn else b.t().contiguous()
            d = ns.selftest_wgmma(a.to(device), b_in.to(device), c.to(device), n, 3, a_regs, b_mn, 0).cpu()
            ref = a.double() @ b.double() + c.double()
            err = (d.double() - ref).abs().max().item()
            if not err <= 1e-5 * (k / 16) * (1 + ref.abs().max().item()):
                fails.append(f"wgmma {dtype} n={n} {'RS' if a_regs else 'SS'} B {'N' if b_mn else 'K'}-major: "
                             f"max error {err:.3e}")
    x = torch.randn(64, 64, generator=g).to(torch.float16)
    y = torch.zeros(64, 64, dtype=torch.float16)
    y_dev = y.to(device)
    tile = ns.selftest_tma_copy(x.to(device), y_dev, 0, 0, 0, 0, 64, 64, 3, False, False).cpu()
    if not (torch.equal(tile, x) and torch.equal(y_dev.cpu(), x)):
        fails.append("TMA 2-D load / store round trip (128-byte swizzle) differs")
    big = torch.randn(3, 80, 6, 104, generator=g).to(torch.float16)
    x4 = big[:, ::2, 1:5, 8:]                      # a strided [B 3, N 40, H 4, D 96] view
    for x0, y0, h0, b0 in ((64, 30, 2, 1), (0, 0, 3, 2)):   # columns past D and rows past N read as 0
        tile = ns.selftest_tma_load_4d(x4.to(device), x0, y0, h0, b0, 16, 64, 3).cpu()
        if not torch.equal(tile, tma_box_4d(x4, x0, y0, h0, b0, 16, 64)):
            fails.append(f"TMA 4-D load (128-byte swizzle) at {(x0, y0, h0, b0)} differs")
    xs = torch.randn(6, 128, generator=g)
    out = ns.selftest_mbarrier(xs.to(device), 0).cpu()
    want = torch.zeros(128)
    for row in xs:
        want = want * 0.5 + row
    if not torch.allclose(out, want, rtol=1e-6, atol=1e-6):
        fails.append("mbarrier producer / consumer ring differs")
    return "; ".join(fails)
