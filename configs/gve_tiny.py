"""Tiny random-init GVE (Qwen2.5-VL-shaped backbone) trained on CPU on the synthetic corpus.

configs/tiny.py's text and vision widths, data and optimizer settings on the GVE backbone
(configs/common.gve): the chat-template conversation, last-token pooling of ``<|endoftext|>``,
InfoNCE text <-> video, LoRA on q/k/v/o. No audio tower (the corpus' audio is decoded and unused).
Evaluation scores text -> video, video -> text, image -> video (a still frame of the clip,
``data.batch.still_frames``) and composed -> video (that still frame + the text "the same shape,
moving <motion>", gold = the clip itself: the image carries shape and colour, the text the motion;
the synthetic corpus writes it as ``meta.composed_query``).

COMMAND: python -m omniret_jax.train --config configs/gve_tiny.py --workdir /tmp/gve
COMMAND: python -m omniret_jax.eval --config configs/gve_tiny.py --checkpoint /tmp/gve --manifest /tmp/gve/corpus/manifest.jsonl --out /tmp/gve/eval
"""

import ml_collections

from configs import common, tiny


def get_config(instruction: str = common.QWEN_DEFAULT_INSTRUCTION) -> ml_collections.ConfigDict:
    """The config argument is the system-turn instruction (``configs/gve_tiny.py:Find the clip.``)."""
    c = common.gve(tiny.get_config("pairwise"), instruction=instruction)
    for key in [k for k in c.model.tiny if k.startswith(("audio_", "beats_"))]:
        del c.model.tiny[key]             # Qwen2.5-VL has neither tower
    return c
