"""The plugin's pieces without an engine: dtype registration, page size, calibration checks."""

import shutil
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from transformers import AutoConfig

from kvquant_vllm.calib.file import CalibrationError, default_calibration_path
from kvquant_vllm.quant.geometry import UnsupportedModelError
from kvquant_vllm.quant.paged import PageLayout
from kvquant_vllm.vllm_plugin import register
from kvquant_vllm.vllm_plugin.calibration import SHIPPED_KEY, load_calibration, ship_calibration
from kvquant_vllm.vllm_plugin.sharding import kv_head_shard


def test_register_is_idempotent_and_adds_dtypes():
    register()
    register()
    from vllm.config import CacheConfig
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    assert CacheConfig(cache_dtype="kvquant3").cache_dtype == "kvquant3"
    assert STR_DTYPE_TO_TORCH_DTYPE["kvquant2"] == torch.uint8
    with pytest.raises(Exception, match="kvquant5|literal"):
        CacheConfig(cache_dtype="kvquant5")


def test_routing_and_page_size():
    register()
    from vllm.platforms import current_platform
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvquant_vllm.vllm_plugin.backend import KVQuant3AttentionBackend

    selector = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="kvquant3", block_size=256)
    assert current_platform.get_attn_backend_cls(None, selector).endswith("KVQuant3AttentionBackend")
    auto = selector._replace(kv_cache_dtype="auto")
    assert "KVQuant" not in current_platform.get_attn_backend_cls(None, auto)

    spec = FullAttentionSpec(block_size=256, num_kv_heads=3, head_size=64, dtype=torch.uint8)
    page = PageLayout(3, 256, 3, 64).page_size_bytes
    packed = KVQuant3AttentionBackend.customize_spec(spec)
    assert page <= packed.page_size_bytes < page + 256
    dense = FullAttentionSpec(block_size=256, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    assert dense.page_size_bytes / packed.page_size_bytes >= 4.3


def test_calibration_errors_name_the_fix(kvquant_model_dir, tmp_path):
    config = AutoConfig.from_pretrained(kvquant_model_dir)
    assert load_calibration("kvquant3", str(kvquant_model_dir), config, None).spec.bits == 3
    with pytest.raises(CalibrationError, match=r"kvquant-vllm calibrate .* --bits 4"):
        load_calibration("kvquant4", str(tmp_path), config, None)
    wrong_bits = tmp_path / "three.safetensors"
    shutil.copy(default_calibration_path(kvquant_model_dir), wrong_bits)
    with pytest.raises(CalibrationError, match=r"needs `--bits 2.*kvquant-vllm calibrate"):
        load_calibration("kvquant2", str(tmp_path), config, {"kvquant_calibration": str(wrong_bits)})
    other = AutoConfig.from_pretrained(kvquant_model_dir, num_key_value_heads=1)
    with pytest.raises(CalibrationError, match="was made for model"):
        load_calibration("kvquant3", str(kvquant_model_dir), other, None)
    no_rope = AutoConfig.from_pretrained(kvquant_model_dir)
    no_rope.position_embedding_type = "absolute"
    with pytest.raises(UnsupportedModelError, match="no rotary position embedding"):
        load_calibration("kvquant3", str(kvquant_model_dir), no_rope, None)


def test_rope_recovered_under_a_bf16_default_dtype():
    """vLLM builds a bf16 model with torch's default dtype set to bf16: the check of the recovered RoPE must not
    round its probe positions (bf16 rounds 319 to 320, past a 320-position table)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from kvquant_vllm.quant.rope import Rope
    from kvquant_vllm.vllm_plugin.rope import rope_of

    with set_current_vllm_config(VllmConfig()):
        rotary = get_rope(64, max_position=320, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                          is_neox_style=True, dtype=torch.float32)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            rope = rope_of(rotary)
        finally:
            torch.set_default_dtype(default)
    torch.testing.assert_close(rope.inv_freq, Rope.default(64, 100000.0).inv_freq)



def test_ropes_the_caches_cannot_follow_are_refused_once_the_model_is_built(monkeypatch):
    """A model's RoPE style and positions are in its code, not its config: what vLLM's rotary cache holds after the
    model is built decides (the backend checks it in process_weights_after_loading)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import rotary_embedding

    from kvquant_vllm.vllm_plugin.rope import check_built_rope

    params = {"rope_theta": 10000.0, "rope_type": "default"}
    with set_current_vllm_config(VllmConfig()):
        monkeypatch.setattr(rotary_embedding, "_ROPE_DICT", {})
        rotary_embedding.get_rope(64, max_position=128, rope_parameters=params, is_neox_style=True)
        check_built_rope(64)
        rotary_embedding.get_rope(128, max_position=128, rope_parameters=params, is_neox_style=False)
        check_built_rope(64)  # an interleaved rotary of another head size (a vision tower's) is not the model's
        rotary_embedding.get_rope(64, max_position=128, rope_parameters=params, is_neox_style=False)
        with pytest.raises(UnsupportedModelError, match=r"interleaved channel pairs .*use another --kv-cache-dtype"):
            check_built_rope(64)
        monkeypatch.setattr(rotary_embedding, "_ROPE_DICT", {})
        rotary_embedding.get_rope(64, max_position=128, rope_parameters=params | {"mrope_section": [8, 12, 12]})
        with pytest.raises(UnsupportedModelError, match=r"multimodal positions \(MRotaryEmbedding\)"):
            check_built_rope(64)

def _vllm_loaded_kv_heads(total_heads: int, total_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """The k_proj heads that vLLM's QKVParallelLinear weight loader gives tensor-parallel rank ``tp_rank``: a k_proj
    weight whose rows of head h all hold h, loaded as that rank (the rank queries patched, nothing else)."""
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter
    from vllm.config import VllmConfig, set_current_vllm_config

    head_size = 2
    with mock.patch.multiple(linear, get_tensor_model_parallel_world_size=lambda: tp_size,
                             get_tensor_model_parallel_rank=lambda: tp_rank), \
            mock.patch.multiple(parameter, get_tensor_model_parallel_world_size=lambda: tp_size,
                                get_tensor_model_parallel_rank=lambda: tp_rank), \
            set_current_vllm_config(VllmConfig()):
        layer = linear.QKVParallelLinear(8, head_size, total_heads, total_kv_heads, bias=False,
                                         params_dtype=torch.float32)
    k_proj = torch.arange(total_kv_heads).repeat_interleave(head_size)[:, None].float().expand(-1, 8).contiguous()
    layer.weight_loader(layer.weight, k_proj, "k")
    start = layer.num_heads * head_size
    return layer.weight[start : start + layer.num_kv_heads * head_size : head_size, 0].long().tolist()


@pytest.mark.parametrize("heads, kv_heads, tp_size", [(9, 3, 3), (4, 4, 2), (8, 4, 4), (4, 2, 4), (8, 2, 8), (4, 1, 2)])
def test_each_rank_takes_the_kv_heads_that_vllm_loads_into_it(heads, kv_heads, tp_size):
    """kv_head_shard against vLLM's own weight loader: split heads (TP divides H) and replicated ones (TP > H)."""
    for rank in range(tp_size):
        assert list(kv_head_shard(kv_heads, rank, tp_size)) == _vllm_loaded_kv_heads(heads, kv_heads, tp_size, rank)


@pytest.mark.parametrize("kv_heads, tp_size", [(3, 2), (4, 3), (2, 3)])
def test_uneven_kv_head_sharding_is_refused(kv_heads, tp_size):
    with pytest.raises(ValueError, match="tensor parallel size"):
        kv_head_shard(kv_heads, 0, tp_size)


def test_page_size_follows_the_rank_kv_heads():
    """A rank's spec carries its own kv heads: its page holds those heads only, and the ratio to a 16-bit page
    of the same heads is the one of the whole model."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvquant_vllm.vllm_plugin.backend import KVQuant3AttentionBackend

    for local_heads in (1, 2, 3):
        spec = FullAttentionSpec(block_size=256, num_kv_heads=local_heads, head_size=64, dtype=torch.uint8)
        packed = KVQuant3AttentionBackend.customize_spec(spec).page_size_bytes
        page = PageLayout(3, 256, local_heads, 64).page_size_bytes
        assert page == local_heads * PageLayout(3, 256, 1, 64).page_size_bytes and page <= packed < page + 256
        dense = FullAttentionSpec(block_size=256, num_kv_heads=local_heads, head_size=64, dtype=torch.bfloat16)
        assert dense.page_size_bytes / packed >= 4.3


def _engine_config(model_dir, additional_config, hf_config=None):
    """What ship_calibration reads of vLLM's VllmConfig."""
    model = SimpleNamespace(model=str(model_dir), hf_config=hf_config or AutoConfig.from_pretrained(model_dir))
    return SimpleNamespace(model_config=model, cache_config=SimpleNamespace(cache_dtype="kvquant3"),
                           additional_config=additional_config)


def test_the_engine_config_carries_the_calibration_to_workers(kvquant_model_dir, tmp_path):
    """What the process that builds the config validates is what a worker decodes, with no file to read there."""
    elsewhere = tmp_path / "moved.safetensors"
    shutil.copy(default_calibration_path(kvquant_model_dir), elsewhere)
    user_settings = {"kvquant_calibration": str(elsewhere)}
    config = _engine_config(kvquant_model_dir, user_settings)
    ship_calibration(config)
    assert user_settings == {"kvquant_calibration": str(elsewhere)}  # the caller's dict is left alone
    assert config.additional_config[SHIPPED_KEY]["path"] == str(elsewhere.resolve())
    from_file = load_calibration("kvquant3", str(kvquant_model_dir), config.model_config.hf_config, user_settings)
    elsewhere.unlink()  # a worker on another machine: no file
    shipped = load_calibration("kvquant3", str(kvquant_model_dir), config.model_config.hf_config,
                               config.additional_config)
    assert shipped.geometry == from_file.geometry and len(shipped.layers) == len(from_file.layers)
    for a, b in zip(shipped.layers, from_file.layers):
        assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in a.TENSORS)
    with pytest.raises(CalibrationError, match=r"needs `--bits 4"):  # checked in the worker too
        load_calibration("kvquant4", str(kvquant_model_dir), config.model_config.hf_config, config.additional_config)
    other = AutoConfig.from_pretrained(kvquant_model_dir, num_key_value_heads=1)
    with pytest.raises(CalibrationError, match="shipped with the engine config.*was made for model"):
        load_calibration("kvquant3", str(kvquant_model_dir), other, config.additional_config)


def test_shipping_checks_the_file_first(kvquant_model_dir, tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        ship_calibration(_engine_config(tmp_path, None, AutoConfig.from_pretrained(kvquant_model_dir)))
    other = AutoConfig.from_pretrained(kvquant_model_dir, num_key_value_heads=1)
    with pytest.raises(CalibrationError, match="was made for model"):
        ship_calibration(_engine_config(kvquant_model_dir, None, other))


def test_batch_invariant_mode_gives_a_row_alone_the_bits_it_has_in_a_batch(monkeypatch):
    """With KVQUANT_BATCH_INVARIANT=1 a one-row oneDNN GEMM (an offline engine's batch-1 decode) equals that row
    in a call of many rows (a server's decode step), bit for bit, at SmolLM2's down projection shape (K = 1536),
    where plain oneDNN rounds a single row differently (benchmarks/cpu_gemm_rows.py, on the CPUs measured)."""
    from vllm import _custom_ops as ops

    from kvquant_vllm.vllm_plugin.cpu_gemm import make_cpu_gemm_batch_invariant

    gen = torch.Generator().manual_seed(0)
    n, k = 576, 1536
    weight = torch.randn(n, k, generator=gen) / k**0.5  # [N, K] float32
    handler = ops.create_onednn_mm(weight.t(), 32)
    x = torch.randn(16, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    monkeypatch.setattr(ops, "onednn_mm", ops.onednn_mm)  # restored after the test

    monkeypatch.setenv("KVQUANT_BATCH_INVARIANT", "0")
    make_cpu_gemm_batch_invariant()
    assert not getattr(ops.onednn_mm, "_kvquant", False)
    monkeypatch.setenv("KVQUANT_BATCH_INVARIANT", "1")
    make_cpu_gemm_batch_invariant()
    make_cpu_gemm_batch_invariant()
    assert ops.onednn_mm._kvquant

    batched = ops.onednn_mm(handler, x, bias)  # [16, N]
    for m in (2, 3, 8):
        assert torch.equal(ops.onednn_mm(handler, x[:m], bias), batched[:m])
    alone = torch.cat([ops.onednn_mm(handler, x[i : i + 1], bias) for i in range(len(x))])
    assert alone.shape == batched.shape and torch.equal(alone, batched)
    assert torch.equal(ops.onednn_mm(handler, x[3], bias), batched[3])  # a [K] row keeps its shape
    reference = x.double() @ weight.double().t() + bias.double()
    torch.testing.assert_close(alone.double(), reference, rtol=0, atol=1e-5)
