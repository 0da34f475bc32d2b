"""Fakes of the self-test ops (csrc/selftest/), so even the test ops trace under torch.compile."""
from __future__ import annotations

import torch


def register(ns: str):
    @torch.library.register_fake(f"{ns}::selftest_mma")
    def _mma_fake(a, b, c, a_trans, b_trans, variant, skip_wait):
        return c.new_empty((16, 8))

    @torch.library.register_fake(f"{ns}::selftest_warp_ops")
    def _warp_fake(x, width):
        return x.new_empty((x.shape[0], 10))
