"""Tiny random-init WAVE trained on CPU on the synthetic corpus (the embedded default).

The corpus is generated into ``<workdir>/corpus`` on the first run. The config
argument picks the ablation preset: frozen | pairwise | distill | full.

COMMAND: python -m omniret_jax.train --config configs/tiny.py --workdir /tmp/run
COMMAND: python -m omniret_jax.train --config configs/tiny.py:distill --workdir /tmp/run_distill --config.train.steps=50
"""

import ml_collections

from configs import common


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    c = common.base_config(preset)
    c.model.init = "random"
    c.model.tiny = ml_collections.ConfigDict(dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mrope_section=(2, 3, 3),
        vision_depth=2, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2,
        vision_fullatt_block_indexes=(1,),
        audio_layers=2, audio_d_model=32, audio_heads=2, audio_ffn=64,
        beats_layers=2, beats_dim=64, beats_heads=4, beats_ffn=128, beats_patch_dim=32, beats_conv_pos=16,
        beats_conv_pos_groups=4, beats_buckets=32, beats_max_distance=64,
    ))
    c.data.synth_n = 64
    c.data.synth_seconds = 2.0
    c.data.synth_size = 64
    c.data.num_frames = 4
    c.data.max_pixels = 56 * 56
    c.data.min_pixels = 56 * 56
    c.data.audio_seconds = 2.0
    c.data.max_caption_chars = 120
    c.embed.text_len = 128
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.optim.lr = 1e-3
    c.loss.temperature = 0.05
    c.train.steps = 120
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.ckpt_every = 40
    return c
