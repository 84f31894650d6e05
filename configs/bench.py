"""The two width sets of the side-by-side benchmark against PyTorch (the speed issue's table).

Both sides read this file: bench/train_step.py builds our model from it and
bench/torch_reference_step.py builds the transformers / peft / openbeats model of the same
widths. The config argument picks the set: tiny | small.

tiny:  text 64 / 128 / 2 layers / 4 heads / 2 KV, M-RoPE [2, 3, 3]; vision depth 2, hidden 32,
       FFN 64, 4 heads, full-attention block 1; audio d_model 32, 2 layers, 4 heads, FFN 64;
       4 frames at 112x112, 4 s of audio, 16-token captions, batch 8.
small: text 512 / 1408 / 4 layers / 8 heads / 2 KV, M-RoPE [8, 12, 12]; vision depth 4, hidden 256,
       FFN 688, 4 heads, full-attention block 3; audio d_model 256, 4 layers, 4 heads, FFN 1024;
       8 frames at 224x224, 8 s of audio, 32-token captions, batch 4.
Both: LoRA r16 / alpha 32 on q/k/v, BEATs at the widths of configs/tiny.py with WAVE's adaptor;
the caption budget (embed.text_len) is the captions' length plus 8 tokens.

COMMAND: python bench/train_step.py --config configs/bench.py:tiny
COMMAND: python bench/compare_torch.py --config configs/bench.py:small
"""

import ml_collections

from configs import tiny as tiny_config

WIDTHS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=(2, 3, 3),
                 vision_depth=2, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=4,
                 vision_fullatt_block_indexes=(1,),
                 audio_layers=2, audio_d_model=32, audio_heads=4, audio_ffn=64),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=(8, 12, 12),
                  vision_depth=4, vision_hidden_size=256, vision_intermediate_size=688, vision_num_heads=4,
                  vision_fullatt_block_indexes=(3,),
                  audio_layers=4, audio_d_model=256, audio_heads=4, audio_ffn=1024),
}
MEDIA = {  # frames, frame side (px), audio seconds, caption tokens, batch
    "tiny": (4, 112, 4.0, 16, 8),
    "small": (8, 224, 8.0, 32, 4),
}


def get_config(widths: str = "tiny") -> ml_collections.ConfigDict:
    if widths not in WIDTHS:
        raise ValueError(f"unknown width set {widths!r}; expected one of {sorted(WIDTHS)}")
    c = tiny_config.get_config("full")
    c.model.tiny.update(WIDTHS[widths])
    frames, side, seconds, caption_tokens, batch = MEDIA[widths]
    c.data.num_frames = frames
    c.data.min_pixels = c.data.max_pixels = side * side
    c.data.audio_seconds = seconds
    c.lora.rank, c.lora.alpha, c.lora.dropout = 16, 32.0, 0.05
    c.train.batch_size = batch
    c.embed.text_len = caption_tokens + 8   # the caption budget: these captions plus a margin
    c.bench = ml_collections.ConfigDict(dict(widths=widths, caption_tokens=caption_tokens))
    return c
