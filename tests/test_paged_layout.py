import math

import pytest
import torch

from kvquant_vllm import bits_per_element
from kvquant_vllm.quant.paged import DTYPE_BITS, PageLayout


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("block_size, heads, head_dim", [(16, 3, 64), (32, 8, 128), (128, 1, 64), (256, 2, 256)])
def test_sections_tile_each_head_segment(bits, block_size, heads, head_dim):
    layout = PageLayout(bits, block_size, heads, head_dim)
    spans = []
    for name, (offset, shape, dtype) in layout.sections().items():
        assert offset % 16 == 0, name
        spans.append((offset, offset + math.prod(shape) * dtype.itemsize))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= layout.head_stride < spans[-1][1] + 16
    assert layout.head_stride % 16 == 0 and layout.page_size_bytes == heads * layout.head_stride
    # Dense codes: block_size * head_dim * bits / 8 bytes per head each for K and V.
    assert layout.sections()["key_codes"][1] == (block_size, head_dim * bits // 8)
    assert layout.key_outlier_capacity == math.ceil(0.01 * block_size * head_dim)


def test_views_alias_their_own_head_and_bytes():
    layout = PageLayout(3, 16, 3, 64)
    cache = torch.zeros(5, layout.page_size_bytes, dtype=torch.uint8)
    layout.view(cache, "value_scale")[2, 1] = 1.5
    layout.view(cache, "key_out_count")[4, 2] = 7
    assert layout.view(cache, "value_scale").shape == (5, 3, 16)
    assert layout.view(cache, "value_scale")[2, 1].eq(1.5).all() and layout.view(cache, "value_scale")[2, 0].eq(0).all()
    assert int(layout.view(cache, "key_out_count")[4, 2]) == 7
    assert cache.ne(0).any(1).nonzero().squeeze(1).tolist() == [2, 4]
    offset, shape, _ = layout.sections()["value_scale"]
    start = layout.head_stride + offset  # head 1's segment
    touched = cache[2].ne(0).nonzero().squeeze(1)
    assert touched.min() >= start and touched.max() < start + 2 * math.prod(shape)


def test_views_of_vllm_sized_pages():
    """vLLM's pages are rounded up to whole tokens: each page holds more bytes than the layout needs."""
    layout = PageLayout(3, 16, 2, 64)
    padded = -(-layout.page_size_bytes // 16) * 16 + 16
    cache = torch.zeros(3, 1, 16, padded // 16, dtype=torch.uint8)
    layout.view(cache, "sink")[1, 1, 0, 5] = 2.0
    assert float(layout.view(cache.view(3, -1)[:, : layout.page_size_bytes], "sink")[1, 1, 0, 5]) == 2.0


def test_bits_per_element_counts_every_byte():
    for dtype, bits in DTYPE_BITS.items():
        layout = PageLayout(bits, 16, 3, 64)
        assert bits_per_element(dtype, 64, 16, 3) == pytest.approx(layout.page_size_bytes * 8 / (2 * 16 * 3 * 64))
        assert bits < bits_per_element(dtype, 64, 16, 3) < bits + 2
    # Larger blocks amortise the per-page tables.
    assert bits_per_element("kvquant3", 128, 128, 8) < bits_per_element("kvquant3", 128, 16, 8)
    # 16-bit key outlier positions at every head dim: kvquant3 at 256-token pages stays under 3.7 bits.
    assert bits_per_element("kvquant3", 128, 256, 8) < 3.7
    with pytest.raises(ValueError, match="unknown kvquant cache dtype 'kvquant5'"):
        bits_per_element("kvquant5", 64, 16)


def test_layouts_that_cannot_hold_16_bit_positions_are_refused():
    with pytest.raises(ValueError, match="block size 512 is too large for head dim 256.*--block-size 256"):
        PageLayout(3, 512, 1, 256)
    with pytest.raises(ValueError, match="multiple of 32"):
        PageLayout(3, 16, 1, 80)
