"""Bit packing of integer codes into bytes.

Codes of ``bits`` bits (1-8) are packed little-endian within groups of 8 codes:
8 codes of b bits fill exactly b bytes, so any width packs densely and the
packed length of n codes is ``ceil(n * bits / 8)``. Three-level codes (trits) pack
five to a byte (3**5 = 243 <= 256), 1.6 bits each.

kvquant pages pack their codes in bit planes instead (:func:`pack_code_planes`), a layout that kernels
unpack with one shift and mask per code from aligned 32-bit words.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: bits must be one of {SUPPORTED_BITS}")


def packed_numel(n: int, bits: int) -> int:
    """Number of bytes that ``n`` codes of ``bits`` bits occupy once packed."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``codes`` into bytes.

    codes: [..., n] integer tensor with values in [0, 2**bits).
    returns: [..., packed_numel(n, bits)] uint8.
    """
    _check_bits(bits)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(codes.min())}, {int(codes.max())}]")
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(*lead, -1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    # 8 codes of at most 8 bits fit one int64; the top byte may set the sign bit, which the masks below ignore.
    word = (c << shifts).sum(-1, keepdim=True)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    packed = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)
    return packed[..., : packed_numel(n, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    packed: [..., packed_numel(n, bits)] uint8.
    returns: [..., n] uint8 codes.
    """
    _check_bits(bits)
    lead = packed.shape[:-1]
    if packed.shape[-1] != packed_numel(n, bits):
        raise ValueError(f"packed length {packed.shape[-1]} does not hold {n} codes of {bits} bits")
    groups = (n + 7) // 8
    p = torch.nn.functional.pad(packed.to(torch.int64), (0, groups * bits - packed.shape[-1]))
    p = p.reshape(*lead, groups, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (p << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = ((word >> shifts) & ((1 << bits) - 1)).reshape(*lead, groups * 8)
    return codes[..., :n].to(torch.uint8)


# Bit planes of a code, low bits first: (width, bit offset within the code).
CODE_PLANES = {2: ((2, 0),), 3: ((2, 0), (1, 2)), 4: ((4, 0),)}


def _plane_words(n: int, width: int) -> int:
    if n % 32:
        raise ValueError(f"bit planes need a multiple of 32 codes per vector, got {n}")
    return n * width // 32


def pack_code_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``codes`` [..., n] (n a multiple of 32, values < 2**bits, bits 2-4) in bit
    planes: [..., n * bits / 8] uint8.

    Plane by plane (:data:`CODE_PLANES`: 3-bit codes are a 2-bit plane then a 1-bit plane), a plane of width
    p is W = n * p / 32 little-endian 32-bit words, and word w holds bits [o, o + p) of the codes
    c = k * W + w (k = 0 .. 32 / p - 1) at bits k * p. So a kernel gets code c from word c % W with one shift
    by (c // W) * p and a mask, the channels c and c + n / 2 (a RoPE pair) share a word, and W consecutive
    channels come from W consecutive words.
    """
    if bits not in CODE_PLANES:
        raise ValueError(f"bit planes take 2, 3 or 4-bit codes, not {bits}")
    n = codes.shape[-1]
    c = codes.to(torch.int64)
    planes = []
    for width, offset in CODE_PLANES[bits]:
        words = _plane_words(n, width)
        field = ((c >> offset) & ((1 << width) - 1)).reshape(*c.shape[:-1], 32 // width, words)
        shifts = torch.arange(32 // width, dtype=torch.int64, device=c.device)[:, None] * width
        word = (field << shifts).sum(-2)  # [..., words], fields do not overlap
        byte_shifts = torch.arange(4, dtype=torch.int64, device=c.device) * 8
        planes.append(((word[..., None] >> byte_shifts) & 0xFF).reshape(*c.shape[:-1], 4 * words))
    return torch.cat(planes, -1).to(torch.uint8)


def unpack_code_planes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_code_planes`: [..., n * bits / 8] uint8 -> [..., n] int64 codes."""
    if bits not in CODE_PLANES:
        raise ValueError(f"bit planes take 2, 3 or 4-bit codes, not {bits}")
    if packed.shape[-1] != n * bits // 8:
        raise ValueError(f"packed length {packed.shape[-1]} does not hold {n} codes of {bits} bits")
    lead = packed.shape[:-1]
    codes = torch.zeros(*lead, n, dtype=torch.int64, device=packed.device)
    start = 0
    for width, offset in CODE_PLANES[bits]:
        words = _plane_words(n, width)
        raw = packed[..., start : start + 4 * words].to(torch.int64).reshape(*lead, words, 4)
        word = (raw << (torch.arange(4, dtype=torch.int64, device=packed.device) * 8)).sum(-1)  # [..., words]
        shifts = torch.arange(32 // width, dtype=torch.int64, device=packed.device)[:, None] * width
        field = (word[..., None, :] >> shifts) & ((1 << width) - 1)  # [..., 32 / width, words]
        codes |= field.reshape(*lead, n) << offset
        start += 4 * words
    return codes


TRITS_PER_BYTE = 5
_TRIT_WEIGHTS = (1, 3, 9, 27, 81)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Pack the last dimension of ``codes`` [..., n] (values 0, 1, 2) base 3, five per byte:
    [..., ceil(n / 5)] uint8."""
    n = codes.shape[-1]
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2):
        raise ValueError(f"trits out of range: [{int(codes.min())}, {int(codes.max())}]")
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, (-n) % TRITS_PER_BYTE))
    c = c.reshape(*codes.shape[:-1], -1, TRITS_PER_BYTE)
    weights = torch.tensor(_TRIT_WEIGHTS, dtype=torch.int64, device=codes.device)
    return (c * weights).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: [..., n] uint8 codes."""
    if packed.shape[-1] != (n + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE:
        raise ValueError(f"packed length {packed.shape[-1]} does not hold {n} trits")
    weights = torch.tensor(_TRIT_WEIGHTS, dtype=torch.int64, device=packed.device)
    codes = (packed.to(torch.int64)[..., None] // weights) % 3
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)
