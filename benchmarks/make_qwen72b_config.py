"""Write vlmscope/plan/configs/qwen2_5_vl_72b/config.json from Qwen2.5-VL-72B-Instruct's public
config values (no download): what `vlmscope plan` needs to count its parameters on the meta
device. Run: python benchmarks/make_qwen72b_config.py"""

from pathlib import Path

from transformers import Qwen2_5_VLConfig

OUT = Path(__file__).parents[1] / "vlmscope" / "plan" / "configs" / "qwen2_5_vl_72b"

config = Qwen2_5_VLConfig(
    text_config={
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
    vision_config={
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3456,
        "out_hidden_size": 8192,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    dtype="bfloat16",
)
if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(OUT)
    print(f"wrote {OUT / 'config.json'}")
