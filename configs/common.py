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
        attention="xla",            # LLM attention kernel: "xla" (any platform) | "cudnn" (GPU flash attention)
        seed=0,
    ))
    c.data = ml_collections.ConfigDict(dict(
        manifest="",                # JSONL manifest; empty -> synthesize a corpus into <workdir>/corpus
        synth_n=256, synth_seconds=3.0, synth_size=64, synth_seed=0,
        num_frames=8, min_pixels=50176, max_pixels=50176, audio_seconds=8.0, audio_mode="start",
        on_missing_audio="silence", max_caption_chars=2048, num_workers=0,
        # A caption over the token budget (embed.text_len - 1 tokens, printed at
        # start-up) is truncated (the reference never cuts one: fixed shapes need a bound) or
        # skipped; counted under caption/too_many_tokens either way.
        on_long_caption="truncate",
        # The text hard negative: another row's caption ("batch", the paper) or a random other
        # record's ("dataset", the released data_qwen.py L850-853).
        text_negative="batch",
        # Manifest lines that do not validate: "skip" (counted with their line numbers) or "error".
        on_bad_record="skip",
        # A record that fails to load is replaced by random records drawn from (seed, slot).
        max_replacements=64,
    ))
    c.embed = ml_collections.ConfigDict(dict(
        text_len=128, length_multiple=8, pack=(), text_fusion_head=False, audio_in_video=False,
        video_prompt="Please describe the video.", audio_prompt="Please describe the audio.",
        av_prompt="Please describe the video and the audio.",
    ))
    c.loss = ml_collections.ConfigDict(dict(
        preset=preset, recipe="paper", l_A=1.0, l_D=1.0, l_T=1.0, temperature=0.01,
        tuple_similarity="joint", hard_negative_pool="",
        rotation="",                # "" = the recipe's: "update" (paper) or "micro_batch" (released)
    ))
    c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=32.0, dropout=0.05))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-5, warmup_ratio=0.03, weight_decay=0.01, clip_norm=1.0,
        accumulate=1,               # micro-batches per update; train.steps counts updates
        decay="all",                # weight decay on "all" trainables or "no_bias_norm"
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # steps, log_every, ckpt_every, stop_every count optimizer updates; batch_size is the global
    # micro-batch (an update sees batch_size x optim.accumulate samples); max_nonfinite counts
    # micro-batches. prefetch: micro-batches a producer thread reads, lays out and places on the
    # devices ahead of the running step, metrics read back only at log / checkpoint / stop (0: the
    # synchronous loop, every micro-batch built, run and read in turn; the same run bitwise). With
    # data.num_workers=0 the thread decodes, where the pipeline's per-sample timer cannot run.
    # stop_every: updates between polls of the stop signal (SIGTERM), agreed by all processes.
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=8, seed=0, log_every=10, ckpt_every=500, keep=3, max_nonfinite=10,
        prefetch=2, stop_every=10,
    ))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c
