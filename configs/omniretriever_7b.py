"""OmniRetriever-7B: WAVE-7B + LoRA (r16, a32, 0.05, q/k/v of all 28 layers) at full scale, two recipes.

The config argument names a recipe, a loss preset, or both (``paper``, ``released``, ``distill``,
``released,pairwise``), plus optionally ``cached``; the default is ``paper,full``.

``paper`` (the paper's text, architecture.md s.5): global batch 64 per update (32 per micro-batch
x 2 accumulation: 8 per device x 4 devices in the reference), one epoch of 11,192 updates, L = L_A
+ L_D + L_T, each anchor against its own hard negative, the hard-negative slot cycling with the
optimizer update, per-modality prompts.

``released`` matches the public code (yunzeliu/Omni-Retriever, training/train.sh and
training/qwenvl/data/data_qwen.py; line numbers of those files). Where it
differs from ``paper``:

| setting | paper | released | source |
|---|---|---|---|
| accumulation | 2 (update = 64) | 8 (update = 256 = 8/GPU x 4 GPUs x 8; in-batch negatives stay the 32 of a micro-batch) | train.sh L49, L52-53, L71-72 |
| updates | 11,192 (one epoch at 64) | 2,798 (the same 716,288 samples at 256) | train.sh L51 (EPOCHS=1) |
| prompts | "Please describe the video." / "... the audio." / "... the video and the audio." | "Please describe the video." for every input without text, audio-only included | data_qwen.py L512 |
| audio in video | off: separate audio block | on for AV and TVA (audio chunks interleaved into the video block) | data_qwen.py L495, L1105; modeling L2554 |
| hard-negative slot and pair rotation | count optimizer updates | count micro-batches (`_neg_step`, `_tuple_step` advance per forward) | modeling L3074-3075, L3180-3185 |
| text hard negative | another sample of the batch (derangement) | a random other record's caption, drawn from the whole dataset | data_qwen.py L850-853 |
| loss | L_A (3 pairs) + L_D (3 students) + L_T, own hard negative | Obj1 (L_T) + Obj2 (detached anchor vs 2 rotating single-modal embeddings) + Obj3 (that pair); every query sees all hard negatives of the batch | modeling L3131-3199, L2597-2623 |
| weight decay | every trainable | every trainable but biases and LayerNorm (transformers' Trainer grouping) | trainer.py `create_optimizer` |
| checkpoints | every 500 updates | every 1000 updates | train.sh L94-96 |

``cached`` (with either recipe, e.g. ``released,cached``): the update of 256 examples is one
contrastive batch, every example the other 255's negative (gradient caching,
``train.contrastive_batch`` / ``train.chunk``, configs/common.py) instead of 8 accumulated
micro-batches of 32 that each see 31:

| setting | released | released,cached |
|---|---|---|
| update | 32 x 8 accumulated = 256 | one contrastive batch of 256, accumulate 1 |
| negatives per example (in batch) | 31 | 255 |
| chunk (examples a forward/backward holds) | 32 (8 per device x 4) | 32 (8 per device x 4) |
| updates | 2,798 | 2,798 (the same samples) |
| compute per update | 1 forward + backward of 256 | + 1 forward of 256 (the no-grad embedding pass) |
| hard-negative slot and pair rotation (`micro_batch`) | advance 8 times per update | advance once per update (one micro-batch) |

With ``paper``: contrastive batch 64 in chunks of 32, 11,192 updates. Needs one process (the
hard-negative view takes its rows' media from this process's batch) and unpacked paths.

The same in both: 8 frames (linspace over the clip) at min = max = 224 * 224 pixels (train.sh
L86-89), 8 s of audio from the start of the clip (train.sh L85, data_qwen.py L667-688), LoRA
r16 / alpha 32 / dropout 0.05 on q/k/v (train.sh L55-56, L90-92; argument.py L36; train_qwen.py
L245-253), AdamW lr 1e-5 cosine, warm-up ratio 0.03, weight decay 0.01 (train.sh L54, L73-76),
clip 1.0 and tau 0.01 (defaults: argument.py L88), trainable LoRA + fusion head + BEATs adaptor
(train_qwen.py L229-244).

Not reproduced, on purpose: the TVA anchor's second `<|im_end|>` (data_qwen.py L726-729 reuse a
label that already ends in one, L840-843; word drop then moves or removes it in the positive);
hard negatives per device (modeling L2580-2582; here the global batch's); dropping the video
hard negative when the local batch mixes grids (L3112; here the layout follows the swapped clip);
counters that restart at 0 on resume (here they are checkpointed); transformers' seed 42 after
train_qwen.py's 2025, sdpa and Liger kernels; model_max_length 2048 without truncation (here the
padded lengths bound a caption: longer ones are truncated and counted).

COMMAND: python -m omniret_jax.train --config configs/omniretriever_7b.py --workdir /ckpt/omniret --config.model.checkpoint=/weights/WAVE-7B --config.data.manifest=/data/train.jsonl
COMMAND: python -m omniret_jax.train --config configs/omniretriever_7b.py:released --workdir /ckpt/omniret_released --config.model.checkpoint=/weights/WAVE-7B --config.data.manifest=/data/train.jsonl
COMMAND: python -m omniret_jax.train --config configs/omniretriever_7b.py:released,cached --workdir /ckpt/omniret_cached --config.model.checkpoint=/weights/WAVE-7B --config.data.manifest=/data/train.jsonl
"""

import ml_collections

from configs import common

RECIPES = ("paper", "released")
PRESETS = ("frozen", "pairwise", "distill", "full")
SAMPLES_PER_EPOCH = 11192 * 64  # the paper's epoch: 11,192 updates of 64


def parse(arg: str) -> tuple[str, str, bool]:
    """'released,pairwise,cached' -> ('released', 'pairwise', True); any part may be left out."""
    recipe, preset, cached = "paper", "full", False
    for part in filter(None, (p.strip() for p in (arg or "").replace("-", ",").split(","))):
        if part in RECIPES:
            recipe = part
        elif part in PRESETS:
            preset = part
        elif part == "cached":
            cached = True
        else:
            raise ValueError(f"config argument {arg!r}: {part!r} is neither a recipe {RECIPES}, a preset {PRESETS} "
                             "nor 'cached'")
    return recipe, preset, cached


def get_config(arg: str = "paper,full") -> ml_collections.ConfigDict:
    recipe, preset, cached = parse(arg)
    c = common.base_config(preset)
    c.model.precision.update(compute="bfloat16", trainable="float32", frozen="bfloat16")
    c.model.remat = "full"
    c.model.scan_layers = True     # one decoder layer compiled instead of one per layer: the 7B batch-8 step
                                   # compiles in 84 s on a CPU; unrolled it had not finished after 28 min
    c.data.num_workers = 16
    # Row lengths follow from the media and the caption budget: the video block holds the batch's
    # patch bucket (256 tokens when every clip is an ordinary one, else the largest grid smart_resize
    # can return at 224 px: 520 tokens for sliver frames it rounds up), 8 s of doubled audio 400, and every TVA row reserves text_len - 1 caption
    # tokens, so the budget is what the joint rows pad to. 95 tokens hold ~70 words; longer captions are truncated and
    # counted by the pipeline (data.on_long_caption).
    c.embed.text_len = 96
    c.data.max_caption_chars = 2000
    c.train.batch_size = 32          # global micro-batch: 8 per device x 4 devices
    c.train.ckpt_every = 500
    c.mesh.data = -1
    c.loss.recipe = recipe
    if recipe == "paper":
        c.optim.accumulate = 2
        c.train.steps = SAMPLES_PER_EPOCH // (c.train.batch_size * c.optim.accumulate)   # 11,192 updates
    else:
        c.optim.accumulate = 8
        c.train.steps = SAMPLES_PER_EPOCH // (c.train.batch_size * c.optim.accumulate)   # 2,798 updates
        c.train.ckpt_every = 1000                                                          # save_steps (train.sh L94-95)
        prompt = "Please describe the video."
        c.embed.update(video_prompt=prompt, audio_prompt=prompt, av_prompt=prompt, audio_in_video=True)
        c.loss.rotation = "micro_batch"
        c.data.text_negative = "dataset"
        c.optim.decay = "no_bias_norm"
    if cached:  # the whole update one contrastive batch, in chunks of the micro-batch's 32
        update = c.train.batch_size * c.optim.accumulate
        c.train.update(contrastive_batch=update, chunk=c.train.batch_size)
        c.optim.accumulate = 1
    return c
