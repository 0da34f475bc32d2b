"""Test harness set-up.

On a machine without a GPU the Triton interpreter and the CUDA host emulation are switched on
*before* triton or the extensions are imported, so the kernel backends run on CPU tensors.
Outputs of every kernel launcher are poisoned with NaN before the kernel writes them
(TILEFORMER_POISON=1), so an element a kernel forgets to write fails the comparison. The emulated CUDA kernels
check every global-memory access against the tensors of their launch (TILEFORMER_EMU_CHECK_BOUNDS=1): an
access outside them raises instead of reading or writing host memory.
"""
import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TILEFORMER_EMULATE_CUDA", "1")
os.environ.setdefault("TILEFORMER_POISON", "1")
os.environ.setdefault("TILEFORMER_EMU_CHECK_BOUNDS", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    import transformer
    lines = [f"tileformer: GPU={'yes: ' + torch.cuda.get_device_name() if HAS_GPU else 'no'}, "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
             f"TILEFORMER_EMULATE_CUDA={os.environ.get('TILEFORMER_EMULATE_CUDA', '0')}"]
    for b, status in transformer.backends.available().items():
        lines.append(f"  backend {b}: {status}")
    return lines


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")
