import pytest
import torch

from kvquant_vllm.quant.packing import SUPPORTED_BITS, pack_codes, pack_trits, packed_numel, unpack_codes, unpack_trits


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 63, 64, 129])
def test_round_trip_random(bits, n, rng):
    codes = torch.randint(0, 1 << bits, (5, 2, n), generator=rng, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, 2, packed_numel(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_extreme_codes(bits):
    top = (1 << bits) - 1
    codes = torch.tensor([[top] * 11, [0] * 11, [top, 0] * 5 + [top]], dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 11), codes)


def test_known_layout():
    # 3-bit codes 0..7 packed little-endian: bit string 000 100 010 110 001 101 011 111 read LSB first.
    codes = torch.arange(8, dtype=torch.uint8)
    word = sum(c << (3 * i) for i, c in enumerate(range(8)))
    expected = torch.tensor([(word >> (8 * i)) & 0xFF for i in range(3)], dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, 3), expected)
    assert torch.equal(pack_codes(torch.tensor([1, 2], dtype=torch.uint8), 4), torch.tensor([0x21], dtype=torch.uint8))


def test_sizes_are_dense():
    assert packed_numel(64, 3) == 24
    assert packed_numel(64, 2) == 16
    assert packed_numel(10, 3) == 4
    assert packed_numel(0, 3) == 0


def test_errors():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_codes(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 9)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 64, 67])
def test_trits_round_trip(n):
    rng = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 3, (3, 2, n), generator=rng, dtype=torch.uint8)
    packed = pack_trits(codes)
    assert packed.shape == (3, 2, -(-n // 5)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_trits(packed, n), codes)
    # Base-3 digits, least significant first: [2, 1, 0, 0, 1] -> 2 + 3 + 81.
    assert int(pack_trits(torch.tensor([2, 1, 0, 0, 1]))[0]) == 86


def test_trits_reject_out_of_range():
    with pytest.raises(ValueError, match="trits out of range"):
        pack_trits(torch.tensor([0, 3]))
