"""fp32 <-> bf16 conversions of Triton's interpreter (TRITON_INTERPRET=1) made to match the GPU.

The interpreter stores bf16 values as their uint16 bits and converts fp32 <-> bf16 in
``InterpreterBuilder.cast_impl`` (triton/runtime/interpreter.py, Triton 3.6 and 3.8) with
``_convert_float(..., rounding_mode=None)``, which

* fp32 -> bf16: keeps the top 16 bits (rounds toward zero) where the GPU's ``cvt.rn.bf16.f32`` rounds to
  nearest, ties to even, and mis-encodes fp32 subnormals (1e-40 gives 0x000b, not 0x0001);
* bf16 -> fp32: maps bf16 subnormals to wrong values (0x0001 gives 0.0).

Every default-rounding ``.to(tl.bfloat16)`` of fp32 reaches it (semantic ``cast`` -> ``create_fp_trunc``),
as do the implicit cast of ``tl.store`` to a bf16 pointer and every bf16 ``.to(tl.float32)``
(``create_fp_ext``). ``patch()`` wraps ``cast_impl`` so these two conversions are done on the bits:
round to nearest even with overflow to +-inf, NaN stays NaN, subnormals exact, bf16 -> fp32 exact. Every
other conversion goes to the interpreter's own code unchanged; fp16 <-> fp32 there is numpy's ``astype``,
which rounds to nearest even already. Conversions with an explicit rounding mode other than "rtne"
(``create_fp_to_fp``) are not changed.

``patch()`` checks the result through the interpreter's own ``TritonSemantic.cast``: if this Triton
already converts like the GPU it changes nothing; if the wrapped function is missing or the check still
fails (a Triton whose interpreter converts elsewhere), it raises, so bf16 results under the interpreter
are never silently truncated.

fp8 e4m3 (``tl.float8e4nv``, stored as uint8 bits): every cast to or from it goes through
``InterpreterBuilder.create_fp_to_fp``, whose ``_convert_float`` truncates fp32 -> e4m3 and loses the carry
of the rounding into the exponent (31.7 gives 16, the GPU 32) and reads the NaN codes 0x7F / 0xFF as +-480.
``patch()`` wraps ``create_fp_to_fp`` as well: fp32 / fp16 / bf16 -> e4m3 rounds to nearest even and
saturates like sm_90's ``cvt.rn.satfinite.e4m3x2.f32`` (NaN -> 0x7F, +-inf and magnitudes past 448 -> +-448),
e4m3 -> fp32 / fp16 / bf16 is exact with 0x7F / 0xFF NaN, checked the same way (``_FP8_PROBE``).
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["bf16_bits_to_f32", "f32_to_bf16_bits", "f32_to_e4m3_bits", "e4m3_bits_to_f32", "patch"]

_state = None   # None: not checked yet; "native": the interpreter already rounds; "patched"


def f32_to_bf16_bits(x) -> np.ndarray:
    """fp32 values -> bf16 bits (uint16), rounded to nearest, ties to even, as the GPU's cvt.rn.bf16.f32:
    finite values past the largest bf16 become +-inf, subnormals round like normal values (bf16 has fp32's
    exponent field), NaN stays NaN (sign and top payload bits kept, quiet bit set)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    # Adding 0x7FFF + lsb carries into bit 16 exactly when the low half is above 0x8000, or equal to it with
    # an odd lsb; a carry out of the mantissa moves to the next binade (or to inf).
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


def bf16_bits_to_f32(b) -> np.ndarray:
    """bf16 bits (uint16) -> fp32 values, exactly (the bits become the top half of the fp32)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_e4m3_bits(x) -> np.ndarray:
    """fp32 values -> fp8 e4m3 bits (uint8) as cvt.rn.satfinite.e4m3x2.f32: round to nearest even; magnitudes
    past 448 (and inf) saturate to +-448; NaN gives 0x7F. Below 2^-6 a subnormal m * 2^-9, m = rint(|x| * 512)."""
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x)
    sign = np.where(np.signbit(x), 0x80, 0).astype(np.int64)
    ab = np.minimum(a, np.float32(448.0)).view(np.uint32).astype(np.int64)
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - (120 << 3)
    sub = np.rint(np.where(a < 0.015625, a, 0).astype(np.float64) * 512.0).astype(np.int64)
    code = np.minimum(np.where(a < 0.015625, sub, normal), 0x7E) | sign
    return np.where(np.isnan(x), 0x7F, code).astype(np.uint8)


def e4m3_bits_to_f32(b) -> np.ndarray:
    """fp8 e4m3 bits (uint8) -> fp32 values, exactly; 0x7F and 0xFF are NaN."""
    b = np.asarray(b, dtype=np.uint8).astype(np.int64)
    e, m = (b >> 3) & 0xF, b & 7
    mag = np.where(e == 0, m * 2.0 ** -9, (8 + m) * np.exp2(e - 10.0))
    val = np.where(b & 0x80, -mag, mag)
    return np.where((b & 0x7F) == 0x7F, np.nan, val).astype(np.float32)


def _wrap_fp_to_fp(original, tl, TensorHandle):
    floats = (tl.float32, tl.float16, tl.bfloat16)

    def to_f32(data, ty):
        return bf16_bits_to_f32(data) if ty == tl.bfloat16 else np.asarray(data).astype(np.float32)

    @functools.wraps(original)
    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == tl.float8e4nv and src_ty in floats:
            return TensorHandle(f32_to_e4m3_bits(to_f32(src.data, src_ty)), dst_ty)
        if src_ty == tl.float8e4nv and dst_ty in floats:
            f = e4m3_bits_to_f32(np.asarray(src.data).view(np.uint8))
            data = f32_to_bf16_bits(f) if dst_ty == tl.bfloat16 else f.astype(np.float16 if dst_ty == tl.float16
                                                                                 else np.float32)
            return TensorHandle(data, dst_ty)
        return original(self, src, dst_type, rounding_mode)
    return create_fp_to_fp


# fp32 -> e4m3 bits: a carry into the exponent (31.675 -> 32), ties to even (down, up, negative), subnormals
# (0.75 ulp up to the smallest, ties 1.5 and 2.5 ulp to 2), one rounding up to the smallest normal, 448,
# saturation (464), -inf, NaN.
_FP8_PROBE = ((0x41FD6666, 0x60), (0x41880000, 0x58), (0x41980000, 0x5A), (0xC1880000, 0xD8), (0x3AC00000, 0x01),
              (0x3B400000, 0x02), (0x3BA00000, 0x02), (0x3C7C0000, 0x08), (0x43E00000, 0x7E), (0x43E80000, 0x7E), (0xFF800000, 0xFE),
              (0x7FC00000, 0x7F))


def _fp8_like_gpu(interp, tl):
    """True when the interpreter's semantic casts fp32 -> e4m3 -> fp32 match _FP8_PROBE and every e4m3 value."""
    sem = interp.TritonSemantic(interp.InterpreterBuilder())

    def cast(data, src_ty, dst_ty):
        x = tl.tensor(interp.TensorHandle(data, src_ty), tl.block_type(src_ty, [data.size]))
        return np.asarray(sem.cast(x, dst_ty).handle.data)

    probe = np.zeros(16, dtype=np.uint32)
    probe[:len(_FP8_PROBE)] = [a for a, _ in _FP8_PROBE]
    down = cast(probe.view(np.float32), tl.float32, tl.float8e4nv)[:len(_FP8_PROBE)]
    if down.view(np.uint8).tolist() != [b for _, b in _FP8_PROBE]:
        return False
    codes = np.arange(256, dtype=np.uint8)
    up = cast(codes, tl.float8e4nv, tl.float32).astype(np.float32)
    want = e4m3_bits_to_f32(codes)
    return bool(np.array_equal(up, want, equal_nan=True) and up[1] == 2.0 ** -9 and up[0x7E] == 448.0)


def _wrap_cast_impl(original, tl, TensorHandle):
    @functools.wraps(original)
    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            return TensorHandle(f32_to_bf16_bits(src.data), dst_ty)
        if src_ty == tl.bfloat16 and dst_ty == tl.float32:
            return TensorHandle(bf16_bits_to_f32(src.data), dst_ty)
        return original(self, src, dst_type)
    return cast_impl


# Probe values (fp32 bits -> expected bf16 bits): ties to even (down and up, both signs), just past a tie,
# a carry into the exponent, fp32 subnormals, overflow to inf, inf, NaN.
_PROBE_DOWN = ((0x3F808000, 0x3F80), (0x3F818000, 0x3F82), (0xBF818000, 0xBF82), (0x3F808001, 0x3F81),
               (0x3F807FFF, 0x3F80), (0x3FFF8000, 0x4000), (0x00018000, 0x0002), (0x000116C2, 0x0001),
               (0x7F7FFFFF, 0x7F80), (0xFF7F8000, 0xFF80), (0x7F800000, 0x7F80), (0x7FC00000, None),
               (0xFF800001, None))
# bf16 bits -> expected fp32 bits: subnormals, normal, inf, NaN.
_PROBE_UP = ((0x0001, 0x00010000), (0x8001, 0x80010000), (0x007F, 0x007F0000), (0x3F81, 0x3F810000),
             (0xFF80, 0xFF800000), (0x7FC1, None))


def _matches(got, want, nan_bits):
    """got (uint bits) equals want bit for bit, where want is None: got is a NaN."""
    return all(g == w if w is not None else nan_bits(g) for g, w in zip(got.tolist(), want))


def _converts_like_gpu(interp, tl):
    """True when the interpreter's semantic cast (what `.to` runs in a kernel) matches _PROBE_DOWN/_PROBE_UP."""
    sem = interp.TritonSemantic(interp.InterpreterBuilder())

    def cast(bits, np_bits, np_val, src_ty, dst_ty):   # block shapes are powers of 2: pad with zeros
        data = np.zeros(16, dtype=np_bits)
        data[:len(bits)] = bits
        if np_val is not None:
            data = data.view(np_val)
        x = tl.tensor(interp.TensorHandle(data, src_ty), tl.block_type(src_ty, [16]))
        return np.asarray(sem.cast(x, dst_ty).handle.data)[:len(bits)]

    down = cast([a for a, _ in _PROBE_DOWN], np.uint32, np.float32, tl.float32, tl.bfloat16)
    up = cast([a for a, _ in _PROBE_UP], np.uint16, None, tl.bfloat16, tl.float32)
    if down.dtype != np.uint16 or up.dtype != np.float32:
        return False
    up = up.view(np.uint32)
    return (_matches(down, [b for _, b in _PROBE_DOWN], lambda g: (g & 0x7FFF) > 0x7F80)
            and _matches(up, [b for _, b in _PROBE_UP], lambda g: (g & 0x7FFFFFFF) > 0x7F800000))


def patch():
    """Make the interpreter's fp32 <-> bf16 conversions round like the GPU (module docstring). Idempotent.
    Returns "native" (this Triton already converts like the GPU) or "patched"; raises RuntimeError when
    neither holds."""
    global _state
    if _state is not None:
        return _state
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as interp

    def fail(why):
        return RuntimeError(
            f"triton_kernels/_interpreter.py: cannot make the fp32 <-> bf16 conversions of the interpreter of "
            f"Triton {triton.__version__} round to nearest even ({why}). Under TRITON_INTERPRET=1 bf16 kernel "
            f"results would be truncated where the GPU rounds; update triton_kernels/_interpreter.py for this Triton.")

    _patch_fp8(interp, tl)
    try:
        if _converts_like_gpu(interp, tl):
            _state = "native"
            return _state
    except Exception as e:   # the probe itself uses interpreter internals
        raise fail(f"probing the interpreter's cast failed: {type(e).__name__}: {e}") from e
    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or not hasattr(interp, "TensorHandle"):
        raise fail("triton.runtime.interpreter has no InterpreterBuilder.cast_impl / TensorHandle")
    builder.cast_impl = _wrap_cast_impl(original, tl, interp.TensorHandle)
    try:
        ok = _converts_like_gpu(interp, tl)
    except Exception as e:
        builder.cast_impl = original
        raise fail(f"the patched cast failed: {type(e).__name__}: {e}") from e
    if not ok:
        builder.cast_impl = original
        raise fail("fp32 <-> bf16 casts no longer go through InterpreterBuilder.cast_impl alone")
    _state = "patched"
    return _state


def _patch_fp8(interp, tl):
    """fp8 e4m3 casts of the interpreter as sm_90's (module docstring); nothing when they already are."""
    import triton

    def fail(why):
        return RuntimeError(
            f"triton_kernels/_interpreter.py: cannot make the fp8 e4m3 casts of the interpreter of Triton "
            f"{triton.__version__} convert like sm_90 ({why}). Under TRITON_INTERPRET=1 fp8 KV caches would be "
            f"quantized differently from the GPU; update triton_kernels/_interpreter.py for this Triton.")
    try:
        if _fp8_like_gpu(interp, tl):
            return
    except Exception as e:
        raise fail(f"probing the interpreter's fp8 cast failed: {type(e).__name__}: {e}") from e
    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "create_fp_to_fp", None)
    if original is None:
        raise fail("triton.runtime.interpreter has no InterpreterBuilder.create_fp_to_fp")
    builder.create_fp_to_fp = _wrap_fp_to_fp(original, tl, interp.TensorHandle)
    try:
        ok = _fp8_like_gpu(interp, tl)
    except Exception as e:
        builder.create_fp_to_fp = original
        raise fail(f"the patched cast failed: {type(e).__name__}: {e}") from e
    if not ok:
        builder.create_fp_to_fp = original
        raise fail("fp8 e4m3 casts no longer go through InterpreterBuilder.create_fp_to_fp alone")
