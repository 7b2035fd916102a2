"""Paged store/load of kvquant pages against the whole-sequence codec."""

from dataclasses import replace

import pytest
import torch

from calib_helpers import random_calibration
from kvquant_vllm.quant.kvquant import KVQuantCodec, kvquant_methods
from kvquant_vllm.quant.pagestore import PagedKVQuant


def _sequence(cal, length: int, rng: torch.Generator, outlier_rate: float = 0.004):
    """Keys mostly inside the calibrated range with a few outliers; values Gaussian."""
    layer = cal.layers[0]
    h, d = layer.key_scale.shape
    u = torch.rand(length, h, d, generator=rng) * 2 - 1
    spikes = (torch.rand(length, h, d, generator=rng) < outlier_rate) * torch.randn(length, h, d, generator=rng) * 4
    key = layer.key_offset + layer.key_scale * (u + spikes)
    return key, torch.randn(length, h, d, generator=rng)


def _store_in_chunks(store, cache, key, value, blocks, chunks):
    bs = store.layout.block_size
    start = 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        slots = blocks[pos // bs] * bs + pos % bs
        store.store(cache, key[start:start + n], store.rotate_values(value[start:start + n]), slots, pos)
        start += n


def _read(store, cache, blocks, length):
    k, v = store.load(cache, blocks)
    h, d = k.shape[-2:]
    k, v = k.reshape(-1, h, d)[:length], v.reshape(-1, h, d)[:length]
    if store.sink:
        sink = store.sinks(cache, blocks[:1])[0]
        k[0], v[0] = sink[0], sink[1]
    return k, store.unrotate(v)


def _codec(dtype: str, cal, block_size: int) -> KVQuantCodec:
    return KVQuantCodec(dtype, replace(kvquant_methods()[dtype], block_size=block_size), cal)


@pytest.mark.parametrize("dtype", ["kvquant2", "kvquant3", "kvquant4"])
@pytest.mark.parametrize("block_size, heads, head_dim", [(16, 2, 64), (32, 4, 128), (64, 1, 64)])
@pytest.mark.parametrize("outlier_rate", [0.004, 0.03])  # lists below capacity; lists overflowing
def test_chunked_paged_store_equals_codec(dtype, block_size, heads, head_dim, outlier_rate, rng):
    spec = kvquant_methods()[dtype].spec
    cal = random_calibration(spec, rng, heads, head_dim)
    store = PagedKVQuant(dtype, cal, 0, block_size)
    length = 3 * block_size + 5
    key, value = _sequence(cal, length, rng, outlier_rate)
    cache = torch.randint(0, 256, (9, store.layout.page_size_bytes), dtype=torch.uint8, generator=rng)
    store.layout.view(cache, "key_out_count").zero_()  # fresh pages: empty outlier lists
    blocks = torch.tensor([7, 2, 5, 0])  # non-contiguous, out of order
    _store_in_chunks(store, cache, key, value, blocks, [block_size // 2 + 3, 1, 2 * block_size, 1, 1, block_size // 2 - 1])
    k, v = _read(store, cache, blocks, length)
    full = store.layout.view(cache, "key_out_count")[blocks] == store.layout.key_outlier_capacity
    assert bool(full.any()) == (outlier_rate > 0.01)
    codec = _codec(dtype, cal, block_size)
    torch.testing.assert_close(k, codec.fake_quant(key, "key", 0), rtol=0, atol=1e-5)
    torch.testing.assert_close(v, codec.fake_quant(value, "value", 0), rtol=0, atol=1e-5)
    if bool(full.any()):  # the capacity matters: unbounded lists decode differently
        assert not torch.allclose(k, _codec(dtype, cal, None).fake_quant(key, "key", 0), rtol=0, atol=1e-3)


def test_overflow_keeps_the_first_of_each_head_and_stays_in_its_list(rng):
    cal = random_calibration(kvquant_methods()["kvquant3"].spec, rng, 2, 64)
    store = PagedKVQuant("kvquant3", cal, 0, 16)
    lay, cap = store.layout, store.layout.key_outlier_capacity
    key, value = _sequence(cal, 16, rng, outlier_rate=0.0)
    layer = cal.layers[0]
    # Outliers grow with the token offset: keeping the largest would keep the last ones.
    magnitude = torch.arange(1, 16 * 2 * 64 + 1, dtype=torch.float32).reshape(16, 2, 64)
    rate = torch.tensor([0.2, 0.005])[None, :, None]  # head 0 overflows its list, head 1 does not
    key = torch.where(torch.rand(16, 2, 64, generator=rng) < rate, layer.key_offset + layer.key_scale * (1 + magnitude), key)
    cache = torch.zeros(3, lay.page_size_bytes, dtype=torch.uint8)
    cache[0], cache[2] = 0xAB, 0xCD
    before = cache[[0, 2]].clone()
    _store_in_chunks(store, cache, key, value, torch.tensor([1]), [5, 11])
    assert torch.equal(cache[[0, 2]], before)
    outlier = ((key - layer.key_offset) / layer.key_scale).abs() > 1
    outlier[0] = False  # position 0 is the sink's
    k, _ = store.load(cache, torch.tensor([1]))
    for head in range(2):
        listed = outlier[:, head].flatten().nonzero().squeeze(1)  # t * D + d, (token, channel) order
        count = int(lay.view(cache, "key_out_count")[1, head])
        assert count == min(cap, len(listed)) and (count == cap) == (head == 0)
        assert torch.equal(lay.key_positions(lay.view(cache, "key_out_pos")[1, head, :count]), listed[:cap])
        exact = ((k[0, :, head] - key[:, head]).abs() < 1e-2 * key[:, head].abs().clamp_min(1)).flatten()
        assert exact[listed[:cap]].all()
        assert not exact[listed[cap:]].any()
    assert len(outlier[:, 0].flatten().nonzero()) > cap


def test_a_stored_token_does_not_change_when_later_tokens_arrive(rng):
    """Token-by-token decode writes the same page as one prefill, and a token's decoded keys are fixed
    from the step it is written in."""
    cal = random_calibration(kvquant_methods()["kvquant3"].spec, rng, 2, 64)
    store = PagedKVQuant("kvquant3", cal, 0, 32)
    key, value = _sequence(cal, 32, rng, outlier_rate=0.05)
    whole = torch.zeros(2, store.layout.page_size_bytes, dtype=torch.uint8)
    _store_in_chunks(store, whole, key, value, torch.tensor([1]), [32])
    stepwise = torch.zeros_like(whole)
    seen = []
    for t in range(32):
        pos = torch.tensor([t])
        store.store(stepwise, key[pos], store.rotate_values(value[pos]), 32 + pos, pos)
        seen.append(store.load(stepwise, torch.tensor([1]))[0][0, : t + 1])
    assert (store.layout.view(whole, "key_out_count")[1] == store.layout.key_outlier_capacity).all()
    assert torch.equal(stepwise, whole)
    final = store.load(whole, torch.tensor([1]))[0][0]
    for t, k in enumerate(seen):
        torch.testing.assert_close(k, final[: t + 1], rtol=0, atol=0)


def test_reused_page_forgets_previous_outliers(rng):
    cal = random_calibration(kvquant_methods()["kvquant4"].spec, rng, 2, 64)
    store = PagedKVQuant("kvquant4", cal, 0, 16)
    codec = _codec("kvquant4", cal, 16)
    blocks = torch.tensor([1])
    old_key, old_value = _sequence(cal, 16, rng, outlier_rate=0.02)
    new_key, new_value = _sequence(cal, 10, rng, outlier_rate=0.0)
    cache = torch.zeros(2, store.layout.page_size_bytes, dtype=torch.uint8)
    _store_in_chunks(store, cache, old_key, old_value, blocks, [16])
    assert (store.layout.view(cache, "key_out_count")[1] > 0).all()
    _store_in_chunks(store, cache, new_key, new_value, blocks, [4, 6])
    k, v = _read(store, cache, blocks, 10)
    torch.testing.assert_close(k, codec.fake_quant(new_key, "key", 0), rtol=0, atol=1e-5)
    torch.testing.assert_close(v, codec.fake_quant(new_value, "value", 0), rtol=0, atol=1e-5)


def test_padding_slots_are_skipped(rng):
    cal = random_calibration(kvquant_methods()["kvquant3"].spec, rng, 2, 64)
    store = PagedKVQuant("kvquant3", cal, 0, 16)
    key, value = _sequence(cal, 4, rng)
    cache = torch.zeros(2, store.layout.page_size_bytes, dtype=torch.uint8)
    store.store(cache, key, value, torch.tensor([-1, -1, -1, -1]), torch.arange(4))
    assert cache.eq(0).all()


def test_uninitialised_pages(rng):
    """Pages of random bytes (counts and positions included, positions past the head's block among them):
    a sequence written from offset 0 decodes as the codec says."""
    cal = random_calibration(kvquant_methods()["kvquant3"].spec, rng, 3, 128)
    store = PagedKVQuant("kvquant3", cal, 0, 128)
    key, value = _sequence(cal, 200, rng, outlier_rate=0.02)
    cache = torch.randint(0, 256, (3, store.layout.page_size_bytes), dtype=torch.uint8, generator=rng)
    store.layout.view(cache, "key_out_pos")[:, :, :8] = -5  # 65531: past the 128 x 128 block for sure
    blocks = torch.tensor([2, 0])
    _store_in_chunks(store, cache, key, value, blocks, [70, 1, 129])
    k, v = _read(store, cache, blocks, 200)
    codec = _codec("kvquant3", cal, 128)
    torch.testing.assert_close(k, codec.fake_quant(key, "key", 0), rtol=0, atol=1e-5)
    torch.testing.assert_close(v, codec.fake_quant(value, "value", 0), rtol=0, atol=1e-5)
    # The unwritten page's garbage (count and positions alike) loads without an out-of-range index.
    store.load(cache, torch.tensor([1]))


@pytest.mark.parametrize("heads", [range(0, 1), range(2, 4), range(1, 4)])
def test_a_shard_of_heads_stores_what_the_whole_store_stores_for_them(heads, rng):
    """A tensor-parallel rank's store (the calibration of its kv heads only) writes, byte for byte, the head
    segments that the store of all heads writes for those heads, and decodes them alike."""
    cal = random_calibration(kvquant_methods()["kvquant3"].spec, rng, 4, 64)
    whole, shard = PagedKVQuant("kvquant3", cal, 0, 16), PagedKVQuant("kvquant3", cal.kv_heads(heads), 0, 16)
    assert shard.layout.num_kv_heads == len(heads) and shard.layout.head_stride == whole.layout.head_stride
    key, value = _sequence(cal, 40, rng, outlier_rate=0.03)
    blocks = torch.tensor([2, 0, 3])
    whole_cache = torch.zeros(4, whole.layout.page_size_bytes, dtype=torch.uint8)
    shard_cache = torch.zeros(4, shard.layout.page_size_bytes, dtype=torch.uint8)
    _store_in_chunks(whole, whole_cache, key, value, blocks, [7, 33])
    _store_in_chunks(shard, shard_cache, key[:, heads.start:heads.stop], value[:, heads.start:heads.stop], blocks,
                     [7, 33])
    segments = whole_cache.view(4, 4, whole.layout.head_stride)[:, heads.start:heads.stop]
    assert torch.equal(shard_cache.view(4, len(heads), -1), segments)
    k_whole, v_whole = _read(whole, whole_cache, blocks, 40)
    k_shard, v_shard = _read(shard, shard_cache, blocks, 40)
    assert torch.equal(k_shard, k_whole[:, heads.start:heads.stop])
    assert torch.equal(v_shard, v_whole[:, heads.start:heads.stop])


def test_kv_heads_of_a_calibration(rng):
    cal = random_calibration(kvquant_methods()["kvquant3"].spec, rng, 4, 64, layers=2)
    part = cal.kv_heads(range(1, 3))
    assert part.geometry.num_kv_heads == 2 and part.geometry.head_dim == 64 and len(part.layers) == 2
    for full, sliced in zip(cal.layers, part.layers):
        assert torch.equal(sliced.key_scale, full.key_scale[1:3])
        assert torch.equal(sliced.key_offset, full.key_offset[1:3])
        assert torch.equal(sliced.key_codebook, full.key_codebook[1:3])  # per channel
    for bad in (range(3, 5), range(2, 2), range(0, 4, 2)):
        with pytest.raises(ValueError, match="not consecutive heads of the calibration's 4"):
            cal.kv_heads(bad)
