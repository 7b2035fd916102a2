"""Collect pre-RoPE keys, values and their Fisher information from a Hugging Face causal LM.

Fisher information of an activation is approximated, as in KVQuant, by the squared gradient of
the language-model loss with respect to it; K and V are tapped where the harness quantizes them
(:func:`~kvquant_vllm.eval.fakequant.tap_kv`), so keys are pre-RoPE by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvquant_vllm.eval.fakequant import tap_kv
from kvquant_vllm.quant.geometry import AttentionGeometry, attention_geometry


@dataclass
class LayerActivations:
    """One layer's calibration samples; every tensor [num_tokens, num_kv_heads, head_dim] float32.

    The gradients are kept signed (Fisher = grad**2) so that post-RoPE keys can rotate them exactly.
    """

    keys: torch.Tensor
    key_grad: torch.Tensor
    values: torch.Tensor
    value_grad: torch.Tensor

    def post_rope_keys(self, geometry: AttentionGeometry, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and their gradients after RoPE at ``positions`` [num_tokens].

        RoPE is a rotation R times the model's attention factor s: k_post = s R k_pre, so dL/dk_post =
        R dL/dk_pre / s exactly.
        """
        rope = geometry.rope()
        return rope.rotate(self.keys, positions), rope.rotate(self.key_grad, positions) * rope.inverse_gain


def collect_activations(model: torch.nn.Module, windows: torch.Tensor, skip_tokens: int = 1) -> list[LayerActivations]:
    """Run ``windows`` [num_windows, seq_len] through ``model`` with backward passes.

    The first ``skip_tokens`` tokens of each window (the attention sink, kept in 16 bits at run
    time) are left out. Parameters get no gradients; only activations do.
    """
    geo = attention_geometry(model.config)
    captured: dict[tuple[str, int], torch.Tensor] = {}
    grads: dict[tuple[str, int], torch.Tensor] = {}

    def capture(kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        captured[(kind, layer)] = x.detach()
        x.register_hook(lambda g: grads.__setitem__((kind, layer), g.detach()))
        return x  # the model goes on with x, so its gradient reaches the hook

    def needs_grad(module, args, out):
        # With frozen parameters nothing would require grad; start the graph at the embeddings.
        return out.requires_grad_(True)

    handles = [model.get_input_embeddings().register_forward_hook(needs_grad), *tap_kv(model, capture)]
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    per_layer: list[dict[str, list[torch.Tensor]]] = [
        {"keys": [], "key_grad": [], "values": [], "value_grad": []} for _ in range(geo.num_layers)
    ]
    try:
        for w in tqdm(windows, desc="collecting K/V and Fisher"):
            logits = model(w[None]).logits[0, :-1].float()
            # A summed (not mean) loss keeps the squared gradients far from float32 underflow.
            F.cross_entropy(logits, w[1:], reduction="sum").backward()
            for layer, acc in enumerate(per_layer):
                for kind, name in (("key", "keys"), ("value", "values")):
                    shape = (-1, geo.num_kv_heads, geo.head_dim)
                    acc[name].append(captured[(kind, layer)][0, skip_tokens:].reshape(shape))
                    acc[f"{kind}_grad"].append(grads[(kind, layer)][0, skip_tokens:].reshape(shape))
            captured.clear()
            grads.clear()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return [LayerActivations(**{k: torch.cat(v) for k, v in acc.items()}) for acc in per_layer]
