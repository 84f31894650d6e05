"""GVE-7B: Qwen2.5-VL-7B-Instruct + LoRA on the LLM, trained as a video embedder (configs/common.gve).

Known (GVE's inference code, Alibaba-NLP/VRAG ``search_engine/models/GVE``, the mteb wrapper, and the
paper summary in ../shared/seeds; see configs/common.gve for the template and pooling):
- backbone Qwen2.5-VL-7B-Instruct (text 3584 wide, 28 layers, 28 / 4 heads, vocab 152064, untied head;
  32-block ViT, tokens_per_second 2); the embedding is the final-norm state of the ``<|endoftext|>``
  appended after the generation prompt, L2-normalised, D = 3584;
- 8 frames per video, uniformly sampled, at most 200 * 28 * 28 pixels per frame (min 4 * 28 * 28, the
  processor's floor in VRAG / mteb); no audio;
- InfoNCE with cross-device negatives (here over the global batch, both directions weighted 0.5, VRAG's
  ``v2t_loss_weight`` default), LoRA on the LLM only.
Unpublished, so config values whose source is this repository's other configs: the temperature 0.01
and LoRA rank 16 / alpha 32 / dropout 0.05 (configs/omniretriever_7b.py, the released OmniRetriever
train.sh), LoRA on q/k/v/o of every decoder layer (configs/common.QKVO_TARGET, as Nemotron's), AdamW
lr 1e-5 with warm-up 0.03 and the base config's 1000 updates (set --config.train.steps for a run of
your own), global batch 32 (one per A100 of the paper's 32). Not reproduced: the hard-negative masking
of VRAG's loss. The instruction is the system turn; the config argument changes the default, or
names a curriculum preset: ``pyramid`` / ``uniform`` (``+tv2v``), the Modality Pyramid as this
project reconstructs it (its formula is unpublished; omniret_jax/data/curriculum.py) with
configs/common.gve_curriculum's task table (the manifest's records name their task: t2v, i2v, ti2v,
tv2v) and probe subsets of ``PROBE_SIZE`` records per task.

COMMAND: python -m omniret_jax.train --config configs/gve_7b.py --workdir /ckpt/gve7b --config.model.checkpoint=/weights/Qwen2.5-VL-7B-Instruct --config.data.manifest=/data/train.jsonl
COMMAND: python -m omniret_jax.train --config configs/gve_7b.py:pyramid --workdir /ckpt/gve7b_pyramid --config.model.checkpoint=/weights/Qwen2.5-VL-7B-Instruct --config.data.manifest=/data/tasks.jsonl
COMMAND: python -m omniret_jax.eval --config configs/gve_7b.py --checkpoint /ckpt/gve7b --manifest /data/bench.jsonl --out /ckpt/gve7b/eval --config.model.checkpoint=/weights/Qwen2.5-VL-7B-Instruct
"""

import ml_collections

from configs import common

FRAME_PIXELS = 200 * 28 * 28      # most pixels per frame (VRAG's indexing max_pixels)
MIN_FRAME_PIXELS = 4 * 28 * 28    # the processor's floor in VRAG's image budget and the mteb wrapper
PROBE_SIZE = 256                  # a real corpus' probe records per task (R@1 in steps of 0.4 %)


def get_config(arg: str = common.QWEN_DEFAULT_INSTRUCTION) -> ml_collections.ConfigDict:
    """The config argument is the system-turn instruction (``configs/gve_7b.py:Find the video.``) or
    a curriculum preset (``configs/gve_7b.py:pyramid``, ``:uniform``, ``:pyramid+tv2v``)."""
    instruction, schedule, text_video = common.gve_preset(arg, "configs/gve_7b.py")
    c = common.gve(common.base_config("pairwise"), instruction=instruction)
    c.model.size = "7b"              # random init without a checkpoint (benchmarks): the 7B shapes
    c.model.precision.update(compute="bfloat16", trainable="float32", frozen="bfloat16")
    c.model.remat = "full"
    c.model.scan_layers = True     # one decoder layer compiled instead of one per layer (compile time)
    c.data.num_frames = 8
    c.data.max_pixels = FRAME_PIXELS
    c.data.min_pixels = MIN_FRAME_PIXELS
    c.data.num_workers = 16
    c.data.max_caption_chars = 2000
    c.embed.text_len = 128
    c.train.batch_size = 32
    c.mesh.data = -1
    if schedule:
        common.gve_curriculum(c, schedule, text_video=text_video)
        c.curriculum.probe_size = PROBE_SIZE
    return c
