"""Fields shared by every config; each config file overrides what differs.

``base_config`` is the WAVE backbone (OmniRetriever); ``nemotron(c)`` switches a config to the
Omni-Embed-Nemotron backbone (the cross-backbone row, paper Appendix L); ``gve(c)`` to GVE (the
General Video Embedder on Qwen2.5-VL).
"""

import ml_collections

from omniret_jax.model.lora import DEFAULT_TARGET, DEFAULT_TRAINABLE_EXTRA

# LoRA on q/k/v/o of every LLM decoder layer (Appendix L: "LoRA on q/k/v/o"), nothing else.
QKVO_TARGET = r"(?:^|\.)language_model\.layers\.\d+\.self_attn\.[qkvo]_proj$"
# Qwen2.5-Omni's default system turn, which its chat template inserts when a conversation has none
# (the model card's usage passes a single user message). Not read from the Nemotron repository's
# own template: unverified there.
QWEN_SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# What GVE's tiny config evaluates: text <-> video, image -> video, composed (image + text) -> video.
GVE_DIRECTIONS = ("T->V", "V->T", "I->V", "TI->V")
# The system prompt of Qwen2.5-VL's chat template when a conversation has none: GVE's default instruction.
QWEN_DEFAULT_INSTRUCTION = "You are a helpful assistant."
CURRICULUM_SCHEDULES = ("pyramid", "uniform")


def base_config(preset: str = "full") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        backbone="wave",            # "wave" (thinker + BEATs + fusion head) | "nemotron" (the plain thinker)
        init="checkpoint",          # "checkpoint" (load_wave / load_thinker) or "random" (uses model.tiny)
        size="7b",                  # random init without model.tiny: the real shapes of "7b" | "3b"
        checkpoint="",              # WAVE-7B or Qwen2.5-Omni-7B directory (config.json + safetensors)
        beats_checkpoint="",        # unilm BEATs .pt when the checkpoint has no beats.* tensors
        init_missing_heads=False,   # True when starting from a plain Qwen2.5-Omni thinker
        tokenizer="",               # defaults to the checkpoint directory
        # The precision policy: activations, trained parameters (LoRA, fusion head, BEATs
        # adaptor), frozen weights (backbone, towers, BEATs: bfloat16 halves their memory).
        precision=ml_collections.ConfigDict(dict(compute="float32", trainable="float32", frozen="float32")),
        remat="none",               # per decoder layer: "none" | "full" (recompute) | "dots" (keep matmuls)
        scan_layers=False,          # True: the decoder layers stacked and run by lax.scan (one layer compiled,
                                    # not L: the 7B step's compile time); checkpoints store adapters stacked
        attention="auto",           # LLM attention kernel: "auto" (blocked on CPU, else xla) | "xla" | "blocked"
                                    # | "cudnn" (GPU flash attention, bf16)
        causal=True,                # False: bidirectional self-attention (padding-only mask)
        seed=0,
    ))
    c.data = ml_collections.ConfigDict(dict(
        manifest="",                # JSONL manifest; empty -> synthesize a corpus into <workdir>/corpus
        synth_n=256, synth_seconds=3.0, synth_size=64, synth_seed=0,
        num_frames=8, min_pixels=50176, max_pixels=50176, audio_seconds=8.0, audio_mode="start",
        on_missing_audio="silence", max_caption_chars=2048, num_workers=0,
        # Patch-row buckets below the every-clip bound P (omniret_jax.data.pipeline.PipelineConfig
        # .patch_bucket_sizes): None -> the frame-area one (1024 at 224 * 224: a batch of ordinary
        # clips pads its video rows and ViT input to that, not to 2080); () -> the bound only
        # (one compile); a tuple -> those. Each size met compiles the step once.
        patch_buckets=ml_collections.config_dict.placeholder(tuple),
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
    # The token layout and pooling of the seven paths (omniret_jax.config.EmbedConfig): WAVE's.
    c.embed = ml_collections.ConfigDict(dict(
        text_len=128, length_multiple=8, pack=(), text_fusion_head=False, audio_in_video=False,
        video_prompt="Please describe the video.", audio_prompt="Please describe the audio.",
        av_prompt="Please describe the video and the audio.",
        turn_start="", turn_end="<|im_end|>", text_first=False, query_prefix="", passage_prefix="",
        pooling="fusion", audio_branch="whisper_beats", image_prompt="Please describe the image.",
        media_kinds=("image", "video", "audio"), max_frames=None,
    ))
    c.loss = ml_collections.ConfigDict(dict(
        preset=preset, recipe="paper", l_A=1.0, l_D=1.0, l_T=1.0, temperature=0.01,
        tuple_similarity="joint", hard_negative_pool="",
        rotation="",                # "" = the recipe's: "update" (paper) or "micro_batch" (released)
        pairs=(),                   # the L_A modality pairs; () = the paper's (T, V), (T, A), (V, A)
    ))
    # target: regex over the dotted module paths of the Linears that get adapters (model/lora.py
    # DEFAULT_TARGET: q/k/v of every LLM layer); `omniret-convert import` sets it from an adapter.
    c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=32.0, dropout=0.05, target=DEFAULT_TARGET,
                                            trainable_extra=DEFAULT_TRAINABLE_EXTRA))
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
    # Gradient caching (omniret_jax.step.CachedGrads): contrastive_batch is the global
    # examples that are each other's negatives, chunk the global examples one forward/backward
    # holds in memory. 0 = no caching: contrastive_batch = batch_size, chunk = contrastive_batch.
    # A non-zero contrastive_batch *is* the micro-batch (it replaces batch_size: the pipeline reads
    # it, one step embeds it chunk by chunk). Rules (omniret_jax.train.grad_cache): contrastive_batch
    # a multiple of chunk, chunk a multiple of the data-parallel devices (mesh data x fsdp),
    # embed.pack = () and one process when chunk < contrastive_batch.
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=8, seed=0, log_every=10, ckpt_every=500, keep=3, max_nonfinite=10,
        prefetch=2, stop_every=10, contrastive_batch=0, chunk=0,
    ))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c


def nemotron(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Switch ``c`` to the Omni-Embed-Nemotron backbone, in place; returns ``c``.

    From its modeling file and model-card usage: the plain Qwen2.5-Omni thinker with every
    decoder layer bidirectional (padding-only mask), no fusion head and no BEATs branch; the
    embedding is the masked mean of the final-norm hidden states over every real token (template
    included), L2-normalised; one user turn of the chat template, ``<|im_end|>\\n`` closing it and
    no generation prompt; the text item first, then the video, then the audio, as separate
    streams (no audio-in-video); prefixes "query: " / "passage: " (its sentence-transformers
    prompts, quoted by third parties). The T path is embedded as a query and every path with
    media as a passage (the card's text-to-media use; each path's vector serves both sides of the
    12 directions). Assumed: Qwen's default system turn (``QWEN_SYSTEM_TURN``) and no instruction
    prompt on the media-only paths. LoRA on q/k/v/o of every decoder layer, nothing else trained
    (Appendix L).
    """
    c.model.backbone = "nemotron"
    c.model.causal = False
    c.model.init_missing_heads = False
    c.model.beats_checkpoint = ""
    c.embed.update(dict(
        pooling="mean", audio_branch="whisper", text_fusion_head=False, audio_in_video=False,
        turn_start=QWEN_SYSTEM_TURN + "<|im_start|>user\n", turn_end="<|im_end|>\n", text_first=True,
        query_prefix="query: ", passage_prefix="passage: ", video_prompt="", audio_prompt="", av_prompt="",
    ))
    c.lora.target = QKVO_TARGET
    c.lora.trainable_extra = ()
    return c


def gve(c: ml_collections.ConfigDict, instruction: str = QWEN_DEFAULT_INSTRUCTION) -> ml_collections.ConfigDict:
    """Switch ``c`` to GVE, in place; returns ``c``.

    From GVE's inference code (Alibaba-NLP/VRAG ``search_engine/models/GVE``: its processor and
    ``last_pool``) and the mteb wrapper: Qwen2.5-VL, causal, no heads, no audio; one chat-template
    conversation, the instruction as the system turn (default Qwen's "You are a helpful
    assistant.", which VRAG gets by sending no system turn), the user turn holding the media
    (image or video) and then the text, the generation prompt ``<|im_start|>assistant\n`` and
    ``<|endoftext|>`` appended after it (VRAG's processor appends that token to every sequence);
    the embedding is that last token's final-norm hidden state, L2-normalised. No prefixes and no
    prompt on the media-only paths (a video document is the video alone). At most 8 frames a
    video (the paper's fixed 8-frame protocol), no audio. Trained: InfoNCE text <-> video over the
    global batch, LoRA on the LLM (q/k/v/o of every decoder layer here). The instruction is one
    per config, both sides of a direction (the mteb wrapper gives documents the default).
    """
    c.model.backbone = "gve"
    c.model.causal = True
    c.model.init_missing_heads = False
    c.model.beats_checkpoint = ""
    c.embed.update(dict(
        pooling="last", audio_branch="whisper", text_fusion_head=False, audio_in_video=False,
        turn_start=f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n",
        turn_end="<|im_end|>\n<|im_start|>assistant\n<|endoftext|>", text_first=False,
        query_prefix="", passage_prefix="", video_prompt="", image_prompt="", audio_prompt="", av_prompt="",
        media_kinds=("image", "video"), max_frames=8,
    ))
    c.loss.pairs = (("T", "V"),)
    c.loss.preset = "pairwise"
    c.eval = ml_collections.ConfigDict(dict(directions=GVE_DIRECTIONS))  # no audio tower: no A directions
    c.lora.target = QKVO_TARGET
    c.lora.trainable_extra = ()
    return c


def gve_preset(arg: str, config: str) -> tuple[str, str, bool]:
    """(instruction, schedule, text_video) of a GVE config's argument: a curriculum preset
    (``pyramid`` or ``uniform``, optionally ``+tv2v``; the default instruction) or else the
    system-turn instruction itself (no curriculum). Raises naming ``config`` for an unknown '+'."""
    preset, _, extra = arg.partition("+")
    if preset not in CURRICULUM_SCHEDULES:
        return arg, "", False
    if extra not in ("", "tv2v"):
        raise ValueError(f"{config}:{arg}: {preset!r} takes '+tv2v' or nothing, not '+{extra}'")
    return QWEN_DEFAULT_INSTRUCTION, preset, extra == "tv2v"


def gve_curriculum(c: ml_collections.ConfigDict, schedule: str = "pyramid", text_video: bool = False
                   ) -> ml_collections.ConfigDict:
    """Train GVE ``c`` with the Modality Pyramid curriculum (``omniret_jax.data.curriculum``), in
    place; returns ``c``. The task table of the synthetic multi-task corpus (``data.synth_tasks``:
    text -> video and still frame -> video on the pyramid's base, the composed still frame + text ->
    video above, resting on the image grounding whose still frame it shares; the tiny model's
    t2v margin stays below 0 for 120 updates, measured, so requiring it would keep ti2v locked); a
    real multi-task manifest brings its own table (config.curriculum.tasks).
    ``schedule``: "pyramid" or "uniform" (every task unlocked, equal weights: the ablation).
    ``text_video`` adds the composed text + video -> video task (tv2v: the composed text over a
    reference clip of the same shape and colour moving another way), beside ti2v on the image
    grounding: the reference clip carries what the still frame carries."""
    if schedule not in CURRICULUM_SCHEDULES:
        raise ValueError(f"curriculum schedule {schedule!r}: expected one of {CURRICULUM_SCHEDULES}")
    c.curriculum = ml_collections.ConfigDict(dict(
        schedule=schedule,
        probe_every=0,              # updates between probes; 0 = once per epoch of the multi-task corpus
        probe_size=16,              # records of each task's fixed probe subset
        prober="current",           # "current": the model being trained; "base": the frozen base model
        unlock_threshold=0.0,       # a task unlocks once every prerequisite's mean margin reaches it
        sigma_start=1.0, sigma_end=0.1,
        tasks=ml_collections.ConfigDict(dict(
            t2v=dict(kind="t2v", level=0, prerequisites=(), ability="coarse"),
            i2v=dict(kind="i2v", level=0, prerequisites=(), ability="coarse"),
            ti2v=dict(kind="ti2v", level=1, prerequisites=("i2v",), ability="fine-grained"),
        )),
    ))
    c.data.synth_tasks = ("t2v", "i2v", "ti2v")
    if text_video:
        c.curriculum.tasks.tv2v = dict(kind="tv2v", level=1, prerequisites=("i2v",), ability="fine-grained")
        c.data.synth_tasks += ("tv2v",)
    return c
