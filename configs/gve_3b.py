"""GVE-3B: Qwen2.5-VL-3B-Instruct + LoRA on the LLM; configs/gve_7b.py's settings on the 3B shapes.

Qwen2.5-VL-3B: text 2048 wide, 36 layers, 16 / 2 heads, intermediate 11008, vocab 151936, the LM head
tied to the embedding table; the same ViT projecting to 2048; embedding D = 2048. Everything else
(8 frames, 200 * 28 * 28 pixels, InfoNCE text <-> video over the global batch, LoRA on q/k/v/o, and
the unpublished temperature / LoRA rank with their stated sources) is configs/gve_7b.py's.

COMMAND: python -m omniret_jax.train --config configs/gve_3b.py --workdir /ckpt/gve3b --config.model.checkpoint=/weights/Qwen2.5-VL-3B-Instruct --config.data.manifest=/data/train.jsonl
COMMAND: python -m omniret_jax.eval --config configs/gve_3b.py --checkpoint /ckpt/gve3b --manifest /data/bench.jsonl --out /ckpt/gve3b/eval --config.model.checkpoint=/weights/Qwen2.5-VL-3B-Instruct
"""

import ml_collections

from configs import common, gve_7b


def get_config(arg: str = common.QWEN_DEFAULT_INSTRUCTION) -> ml_collections.ConfigDict:
    """The instruction or curriculum preset, as configs/gve_7b.py takes it."""
    c = gve_7b.get_config(arg)
    c.model.size = "3b"
    return c
