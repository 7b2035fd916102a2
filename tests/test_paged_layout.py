import math

import pytest
import torch

from kvquant_vllm import bits_per_element
from kvquant_vllm.quant.paged import DTYPE_BITS, PageLayout


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("block_size, heads, head_dim", [(16, 3, 64), (32, 8, 128), (128, 1, 64)])
def test_sections_tile_the_page(bits, block_size, heads, head_dim):
    layout = PageLayout(bits, block_size, heads, head_dim)
    spans = []
    for name, (offset, shape, dtype) in layout.sections().items():
        assert offset % 4 == 0, name
        spans.append((offset, offset + math.prod(shape) * torch.empty(0, dtype=dtype).element_size()))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= layout.page_size_bytes < spans[-1][1] + 4
    # Dense codes: block_size * heads * head_dim * bits / 8 bytes each for K and V.
    assert layout.sections()["key_codes"][1] == (block_size, heads, head_dim * bits // 8)
    assert layout.key_outlier_capacity == math.ceil(0.01 * block_size * heads * head_dim)


def test_views_alias_their_own_bytes():
    layout = PageLayout(3, 16, 3, 64)
    cache = torch.zeros(5, layout.page_size_bytes, dtype=torch.uint8)
    layout.view(cache, "value_scale")[2] = 1.5
    layout.view(cache, "key_out_count")[4] = 7
    assert layout.view(cache, "value_scale")[2].eq(1.5).all()
    assert int(layout.view(cache, "key_out_count")[4]) == 7
    touched = cache.ne(0).any(1).nonzero().squeeze(1).tolist()
    assert touched == [2, 4]
    offset, shape, _ = layout.sections()["value_scale"]
    assert cache[2, :offset].eq(0).all() and cache[2, offset + 2 * math.prod(shape):].eq(0).all()


def test_bits_per_element_counts_every_byte():
    for dtype, bits in DTYPE_BITS.items():
        layout = PageLayout(bits, 16, 3, 64)
        assert bits_per_element(dtype, 64, 16, 3) == pytest.approx(layout.page_size_bytes * 8 / (2 * 16 * 3 * 64))
        assert bits < bits_per_element(dtype, 64, 16, 3) < bits + 2
    # Larger blocks amortise the per-page tables.
    assert bits_per_element("kvquant3", 128, 128, 8) < bits_per_element("kvquant3", 128, 16, 8)
    with pytest.raises(ValueError, match="unknown kvquant cache dtype 'kvquant5'"):
        bits_per_element("kvquant5", 64, 16)
