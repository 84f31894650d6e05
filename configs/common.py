"""Fields shared by every config; each config file overrides what differs."""

import ml_collections


def base_config(preset: str = "full") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        init="checkpoint",          # "checkpoint" (load_wave) or "random" (uses model.tiny)
        checkpoint="",              # WAVE-7B or Qwen2.5-Omni-7B directory (config.json + safetensors)
        beats_checkpoint="",        # unilm BEATs .pt when the checkpoint has no beats.* tensors
        init_missing_heads=False,   # True when starting from a plain Qwen2.5-Omni thinker
        tokenizer="",               # defaults to the checkpoint directory
        # The precision policy: activations, trained parameters (LoRA, fusion head, BEATs
        # adaptor), frozen weights (backbone, towers, BEATs: bfloat16 halves their memory).
        precision=ml_collections.ConfigDict(dict(compute="float32", trainable="float32", frozen="float32")),
        remat="none",               # per decoder layer: "none" | "full" (recompute) | "dots" (keep matmuls)
        seed=0,
    ))
    c.data = ml_collections.ConfigDict(dict(
        manifest="",                # JSONL manifest; empty -> synthesize a corpus into <workdir>/corpus
        synth_n=256, synth_seconds=3.0, synth_size=64, synth_seed=0,
        num_frames=8, min_pixels=50176, max_pixels=50176, audio_seconds=8.0, audio_mode="start",
        on_missing_audio="silence", max_caption_chars=2048, num_workers=0,
    ))
    c.embed = ml_collections.ConfigDict(dict(
        text_len=128, seq_len=1024, text_fusion_head=False, audio_in_video=False,
        video_prompt="Please describe the video.", audio_prompt="Please describe the audio.",
        av_prompt="Please describe the video and the audio.",
    ))
    c.loss = ml_collections.ConfigDict(dict(
        preset=preset, recipe="paper", l_A=1.0, l_D=1.0, l_T=1.0, temperature=0.01,
        tuple_similarity="joint", hard_negative_pool="",
    ))
    # target: regex over the dotted module paths of the Linears that get adapters; "" = q/k/v of
    # every LLM layer (model/lora.py DEFAULT_TARGET). `omniret-convert import` sets it from an adapter.
    c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=32.0, dropout=0.05, target=""))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-5, warmup_ratio=0.03, weight_decay=0.01, clip_norm=1.0, accumulate=1,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=8, seed=0, log_every=10, ckpt_every=500, keep=3, max_nonfinite=10,
    ))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c
