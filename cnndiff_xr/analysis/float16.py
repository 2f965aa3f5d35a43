"""float16 -> float32 conversion of gathered row blocks, bit-identical to numpy's cast and several times faster.

Stores may hold float16 activations (half the bytes to read and move); the Gram products run in float32, so every
row block of a float16 layer is converted once, when it is assembled (see :mod:`cnndiff_xr.analysis.blocks`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["half_to_float"]

#: every float16 bit pattern's float32 value (256 KiB), for :func:`half_to_float`
_HALF_TO_FLOAT = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
_HALF_PIECE = 2**15  # values converted at a time by :func:`half_to_float`'s table lookup (cache-sized)
#: values converted at a time by the shift: it makes no index temporary, so larger pieces only save Python's per-call
#: cost (a Gram product's column block of 174 rows x 1,024 units: one call instead of six), while a piece still fits
#: the cache between its two passes (shift, multiply)
_SHIFT_PIECE = 2**18
_HALF_INF_BITS = 0x7C00  # float16 +inf: bit patterns from here up are inf, NaN or negative
_HALF_TO_FLOAT_SCALE = np.float32(2.0**112)  # 2**(127 - 15): float16's exponent bias to float32's


def half_to_float(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 -> float32 (into ``out`` if given), bit-identical to ``x.astype(np.float32)``.

    numpy's cast branches on each value (zero, subnormal, normal, inf/nan) with no SIMD path;
    on ReLU activations, about half zeros in no predictable order, it runs at ~3.5 ns per
    value. When every value is finite and non-negative (any ReLU layer; one integer
    reduction tells), the float16 bits shifted into float32's exponent and mantissa places
    and multiplied by 2**112 are the value: zeros stay zero, subnormals come out normal and
    exact, all in vectorised integer and float passes (~0.4 ns per value). Anything else
    (negative values, inf, NaN) goes by a 65,536-entry table lookup (~1.5 ns per value).
    The lookup runs in cache-sized pieces (``np.take`` first copies its indices to intp, 8
    bytes per value: over a whole block that temporary costs more than the lookup), the
    shift in pieces of 256 Ki values (fewer calls; it makes no temporary). A 2-d ``x``
    (say a column slice of a row block) is converted a few whole rows at a time, without a
    contiguous copy, into an ``out`` whose rows are contiguous (say a column slice of a buffer).
    """
    x = np.asarray(x)
    if out is None:
        out = np.empty(x.shape, np.float32)
    rows_ok = x.ndim == 2 and out.ndim == 2 and out.strides[1] == out.itemsize  # rows contiguous (a column slice)
    if out.dtype != np.float32 or out.shape != x.shape or not (out.flags.c_contiguous or rows_ok):
        raise ValueError("half_to_float: out must be float32 of x's shape, C-contiguous (2-d: each row contiguous)")
    if not x.size:
        return out
    bits = x.view(np.uint16)  # same item size: a view even of a strided x
    by_shift = int(bits.max()) < _HALF_INF_BITS

    def convert(piece_bits: np.ndarray, piece_out: np.ndarray) -> None:
        if by_shift:
            np.left_shift(piece_bits, 13, out=piece_out.view(np.uint32), dtype=np.uint32)
            np.multiply(piece_out, _HALF_TO_FLOAT_SCALE, out=piece_out)
        else:
            np.take(_HALF_TO_FLOAT, piece_bits, out=piece_out)

    piece = _SHIFT_PIECE if by_shift else _HALF_PIECE
    if x.ndim == 2:  # whole rows at a time (a column slice needs no copy)
        step = max(1, piece // x.shape[1])
        for lo in range(0, x.shape[0], step):
            convert(bits[lo : lo + step], out[lo : lo + step])
        return out
    bits, flat = bits.reshape(-1), out.reshape(-1)
    for lo in range(0, bits.size, piece):
        convert(bits[lo : lo + piece], flat[lo : lo + piece])
    return out

