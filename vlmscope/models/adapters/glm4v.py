"""GLM-4V (GLM-4.1V): Qwen-style vision with a 2x2 merger, GLM decoder with four norms.

Attention's and the MLP's contributions leave through post-norms (`post_self_attn_layernorm`,
`post_mlp_layernorm`); the MLP reads `post_attention_layernorm`. Positions are M-RoPE indices
the model derives from the mask and the image grids, so no position_ids are passed.
"""

from __future__ import annotations

from vlmscope.models.adapter import LayerMap
from vlmscope.models.adapters.qwen_vl import QwenVLAdapter
from vlmscope.models.registry import register_adapter


@register_adapter
class Glm4vAdapter(QwenVLAdapter):
    family = "glm4v"
    model_types = ("glm4v",)
    architectures = ("Glm4vForConditionalGeneration",)
    layer_map = LayerMap(
        attn_out="post_self_attn_layernorm",
        mlp_in_norm="post_attention_layernorm",
        mlp_out="post_mlp_layernorm",
        mlp_projections={"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
    )
