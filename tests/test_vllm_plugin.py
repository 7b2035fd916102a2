"""The plugin's pieces without an engine: dtype registration, page size, calibration checks."""

import shutil

import pytest
import torch
from transformers import AutoConfig

from kvquant_vllm.calib.file import CalibrationError, default_calibration_path
from kvquant_vllm.quant.geometry import UnsupportedModelError
from kvquant_vllm.quant.paged import PageLayout
from kvquant_vllm.vllm_plugin import register
from kvquant_vllm.vllm_plugin.calibration import load_calibration


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
