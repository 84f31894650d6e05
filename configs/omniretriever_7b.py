"""OmniRetriever-7B: WAVE-7B + LoRA (r16, a32, q/k/v of all 28 layers), the paper's recipe at full scale.

Global batch 64 (8 per device x 4 devices x 2 accumulation in the reference), AdamW lr 1e-5 cosine with
3 % warm-up, weight decay 0.01, clip 1.0, tau 0.01, bf16, one epoch of 11,192 steps. The config argument
picks the ablation preset (frozen | pairwise | distill | full).

COMMAND: python -m omniret_jax.train --config configs/omniretriever_7b.py --workdir /ckpt/omniret --config.model.checkpoint=/weights/WAVE-7B --config.data.manifest=/data/train.jsonl
"""

import ml_collections

from configs import common


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    c = common.base_config(preset)
    c.model.precision.update(compute="bfloat16", trainable="float32", frozen="bfloat16")
    c.model.remat = "full"
    c.data.num_workers = 16
    # Row lengths follow from the media (8 frames at 224 px: 256 video tokens; 8 s of doubled audio:
    # 400) and the caption budget: every TVA row reserves text_len - 1 caption tokens, so the budget
    # is what the joint rows pad to. 95 tokens hold ~70 words (longer captions are truncated and
    # counted by the pipeline).
    c.embed.text_len = 96
    c.data.max_caption_chars = 1000
    c.optim.accumulate = 2
    c.train.batch_size = 32          # per optimizer micro-step, global (x accumulate = 64)
    c.train.steps = 11192 * 2        # micro-steps of one epoch at accumulate 2
    c.train.ckpt_every = 500
    c.mesh.data = -1
    return c
