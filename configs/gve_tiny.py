"""Tiny random-init GVE (Qwen2.5-VL-shaped backbone) trained on CPU on the synthetic corpus.

configs/tiny.py's text and vision widths, data and optimizer settings on the GVE backbone
(configs/common.gve): the chat-template conversation, last-token pooling of ``<|endoftext|>``,
InfoNCE text <-> video, LoRA on q/k/v/o. No audio tower (the corpus' audio is decoded and unused).
Evaluation scores text -> video, video -> text, image -> video (a still frame of the clip,
``data.batch.still_frames``) and composed -> video (that still frame + the text "the same shape,
moving <motion>", gold = the clip itself: the image carries shape and colour, the text the motion;
the synthetic corpus writes it as ``meta.composed_query``).

The config argument is the system-turn instruction (``configs/gve_tiny.py:Find the clip.``), or a
curriculum preset (``common.gve_curriculum``) on the multi-task synthetic corpus (48 clips with
distinct shape x colour x motion, one t2v, i2v and ti2v record each): ``pyramid`` (the Modality
Pyramid: ti2v unlocks once i2v, the image grounding it builds on, is aligned) or ``uniform`` (its
ablation baseline); ``pyramid+tv2v`` / ``uniform+tv2v`` add the text + video -> video task (each
record's ``query_video`` a reference clip of the same shape and colour moving another way).

COMMAND: python -m omniret_jax.train --config configs/gve_tiny.py --workdir /tmp/gve
COMMAND: python -m omniret_jax.eval --config configs/gve_tiny.py --checkpoint /tmp/gve --manifest /tmp/gve/corpus/manifest.jsonl --out /tmp/gve/eval
COMMAND: python -m omniret_jax.train --config configs/gve_tiny.py:pyramid --workdir /tmp/gve_pyramid --config.train.steps=60
COMMAND: python -m omniret_jax.eval --config configs/gve_tiny.py:pyramid --checkpoint /tmp/gve_pyramid --manifest /tmp/gve_pyramid/corpus/manifest.jsonl --out /tmp/gve_pyramid/eval --by_task
COMMAND: python -m omniret_jax.train --config configs/gve_tiny.py:pyramid+tv2v --workdir /tmp/gve_tv2v --config.train.steps=60
"""

import ml_collections

from configs import common, tiny


def get_config(arg: str = common.QWEN_DEFAULT_INSTRUCTION) -> ml_collections.ConfigDict:
    instruction, schedule, text_video = common.gve_preset(arg, "configs/gve_tiny.py")
    c = common.gve(tiny.get_config("pairwise"), instruction=instruction)
    for key in [k for k in c.model.tiny if k.startswith(("audio_", "beats_"))]:
        del c.model.tiny[key]             # Qwen2.5-VL has neither tower
    if schedule:
        common.gve_curriculum(c, schedule, text_video=text_video)
        c.data.synth_n = 48
    return c
