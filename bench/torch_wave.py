"""PyTorch WAVE for the reference step: transformers thinker + peft LoRA + openbeats BEATs + WAVE heads.

Written from shared/spec/architecture.md (sections 1-3) and method.md, not from the JAX code.
Three parts, used by bench/torch_reference_step.py:

- ``build_wave``: a random-init ``Qwen2_5OmniThinkerForConditionalGeneration`` (sdpa attention,
  no LM head), ESPnet's ``BeatsEncoder`` from openbeats, and the WAVE heads
  (``classify_linear``, ``beats_ln``, ``beats_proj``); peft LoRA on q/k/v of every LLM decoder layer.
- ``Collator``: host-side batch preparation, as an HF data collator / Qwen fine-tuning dataset does
  it: token ids of every LLM pass, LEFT-padded to that pass's longest row, attention masks, M-RoPE
  position ids from the thinker's own ``get_rope_index``, packed vision patches, Whisper / BEATs
  masks, and gather indices that place tower outputs into another row (the hard negative).
- ``TorchWave`` methods for the device side: frozen towers once per view, the BEATs adaptor
  (trainable), one LLM pass with last-position pooling, and the loss of the paper recipe.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.torchaudio_stub import import_beats_encoder  # noqa: E402  (openbeats without torchaudio)

# ----------------------------------------------------------------------------- token ids


@dataclasses.dataclass(frozen=True)
class Ids:
    audio: int
    image: int
    video: int
    audio_bos: int
    audio_eos: int
    vision_bos: int
    vision_eos: int
    im_end: int
    pad: int

    def encode(self, s: str) -> list[int]:
        """Byte tokenizer: UTF-8 bytes + 1 (the tiny models' tokenizer; also used at 7B shapes,
        where ids 1..256 are ordinary vocabulary entries)."""
        return [b + 1 for b in s.encode()]


TINY_IDS = Ids(audio=300, image=301, video=302, audio_bos=303, audio_eos=304, vision_bos=305, vision_eos=306,
               im_end=307, pad=0)
REAL_IDS = Ids(audio=151646, image=151655, video=151656, audio_bos=151647, audio_eos=151648, vision_bos=151652,
               vision_eos=151653, im_end=151645, pad=151643)

# The `cfg` of unilm's BEATs_iter3_plus_AS2M.pt (architecture.md s.2), in openbeats' key names.
BEATS_ITER3_PLUS = {
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12,
    "activation_fn": "gelu", "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0, "dropout_input": 0.0, "layer_norm_first": False, "conv_bias": False,
    "conv_pos": 128, "conv_pos_groups": 16, "relative_position_embedding": True, "num_buckets": 320,
    "max_distance": 800, "gru_rel_pos": True, "deep_norm": True, "input_patch_size": 16,
    "layer_wise_gradient_decay_ratio": 0.6, "embed_dim": 512, "finetuned_model": False,
    "predictor_dropout": 0.0, "predictor_class": 527,
}

# Qwen2.5-Omni-7B thinker sizes (architecture.md s.1). transformers' Qwen2_5OmniVisionEncoderConfig
# defaults its hidden_size to 3584; the released model's vision tower is 1280 wide, so it is set here.
SEVEN_B = dict(
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, mrope_section=[16, 24, 24]),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                fullatt_block_indexes=[7, 15, 23, 31]),
    audio=dict(encoder_layers=32, d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120),
)


def widths_from_config(c) -> dict:
    """Text / vision / audio sizes of a configs/bench.py width set (its ``model.tiny`` block)."""
    t = c.model.tiny
    return dict(
        text=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                  num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                  num_key_value_heads=t.num_key_value_heads, mrope_section=list(t.mrope_section)),
        vision=dict(depth=t.vision_depth, hidden_size=t.vision_hidden_size,
                    intermediate_size=t.vision_intermediate_size, num_heads=t.vision_num_heads,
                    fullatt_block_indexes=list(t.vision_fullatt_block_indexes)),
        audio=dict(encoder_layers=t.audio_layers, d_model=t.audio_d_model, encoder_attention_heads=t.audio_heads,
                   encoder_ffn_dim=t.audio_ffn),
    )


def beats_from_config(c) -> dict:
    """openbeats config dict: iter3+ with the beats_* widths of configs/tiny.py."""
    t = c.model.tiny
    return dict(BEATS_ITER3_PLUS, encoder_layers=t.beats_layers, encoder_embed_dim=t.beats_dim,
                encoder_attention_heads=t.beats_heads, encoder_ffn_embed_dim=t.beats_ffn, embed_dim=t.beats_patch_dim,
                conv_pos=t.beats_conv_pos, conv_pos_groups=t.beats_conv_pos_groups, num_buckets=t.beats_buckets,
                max_distance=t.beats_max_distance)


def with_layers(widths: dict, beats: dict, layers: int) -> tuple[dict, dict]:
    """The same widths with every stack cut to ``layers`` layers (a smoke-test knob for 7B shapes)."""
    w = {k: dict(v) for k, v in widths.items()}
    w["text"]["num_hidden_layers"] = layers
    w["vision"]["depth"] = layers
    w["vision"]["fullatt_block_indexes"] = [i for i in w["vision"]["fullatt_block_indexes"] if i < layers] or [
        layers - 1]
    w["audio"]["encoder_layers"] = layers
    return w, dict(beats, encoder_layers=layers)


def thinker_config(widths: dict, ids: Ids):
    from transformers import Qwen2_5OmniThinkerConfig

    text = dict(widths["text"])
    mrope = text.pop("mrope_section")
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(text, rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}),
        vision_config=dict(widths["vision"], out_hidden_size=text["hidden_size"], patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, window_size=112, hidden_act="silu"),
        audio_config=dict(widths["audio"], num_mel_bins=128, output_dim=text["hidden_size"], n_window=100,
                          max_source_positions=1500),
        audio_token_index=ids.audio, image_token_index=ids.image, video_token_index=ids.video,
        audio_start_token_id=ids.audio_bos, audio_end_token_id=ids.audio_eos,
        # Not a declared field of the thinker config, but get_rope_index reads it (architecture.md s.6).
        vision_start_token_id=ids.vision_bos, vision_end_token_id=ids.vision_eos,
        position_id_per_seconds=25, seconds_per_chunk=2,
    )


# ----------------------------------------------------------------------------- the model


class TorchWave(nn.Module):
    """WAVE: thinker (LoRA on LLM q/k/v) + BEATs + fusion head + BEATs adaptor."""

    def __init__(self, thinker, beats, ids: Ids, text_fusion_head: bool = False):
        super().__init__()
        self.thinker = thinker          # LoRA layers injected in place by peft (see build_wave)
        self.beats = beats
        d = thinker.config.text_config.hidden_size
        n_layers = thinker.config.text_config.num_hidden_layers
        c = beats.config.encoder_embed_dim
        self.classify_linear = nn.Sequential(nn.Linear(n_layers * d, d), nn.GELU(), nn.Linear(d, d))
        self.beats_ln = nn.LayerNorm(c)
        self.beats_proj = nn.Sequential(nn.Linear(c, d), nn.GELU(), nn.Linear(d, d))
        self.ids = ids
        self.text_fusion_head = text_fusion_head

    @property
    def llm(self):
        return self.thinker.model.language_model

    @property
    def llm_dtype(self):
        return self.llm.embed_tokens.weight.dtype

    # -- frozen towers (callers run these under no_grad) --------------------------------------
    def towers(self, v: dict) -> dict:
        """Vision, Whisper and BEATs of one view, each once over the whole (packed / masked) batch."""
        m = self.thinker.model
        vis = m.visual(v["patches"].to(m.visual.dtype), grid_thw=v["grid"]).pooler_output  # [sum n_v, D]
        whisper = m.get_audio_features(v["mel"].to(m.audio_tower.dtype),
                                       feature_attention_mask=v["mel_mask"]).last_hidden_state  # [sum N_w, D]
        bdt = self.beats.patch_embedding.weight.dtype
        tok, pad = self.beats.extract_features(v["fbank"].to(bdt), v["fbank_pad"], skip_fbank_extraction=True)[:2]
        # Cut or zero-pad every row's tokens to 2 * N_w, pool pairs, keep each row's first N_w.
        tok = tok.masked_fill(pad[..., None], 0.0)
        width = v["beats_len"]
        tok = tok[:, :width] if tok.shape[1] >= width else F.pad(tok, (0, 0, 0, width - tok.shape[1]))
        pooled = tok.view(tok.shape[0], width // 2, 2, -1).mean(2)
        return dict(vis=vis, whisper=whisper, beats=pooled[v["pool_keep"]])

    def audio_tokens(self, whisper: torch.Tensor, beats_pooled: torch.Tensor) -> torch.Tensor:
        """BEATs adaptor (trainable) and the W0, B0, W1, B1, ... interleave: [sum 2 N_w, D]."""
        b = self.beats_proj(self.beats_ln(beats_pooled.to(self.beats_ln.weight.dtype))).to(whisper.dtype)
        return torch.stack([whisper, b], dim=1).reshape(-1, whisper.shape[-1])

    # -- one LLM pass -------------------------------------------------------------------------
    def embed(self, p: dict, vis: torch.Tensor | None = None, aud: torch.Tensor | None = None,
              fusion: bool = True) -> torch.Tensor:
        """L2-normalised float32 embedding of a left-padded pass (pooled at the last position)."""
        emb = self.llm.embed_tokens(p["ids"])
        if p.get("video_mask") is not None:
            src = vis if p["vis_index"] is None else vis.index_select(0, p["vis_index"])
            emb = emb.masked_scatter(p["video_mask"][..., None], src.to(emb.dtype))
        if p.get("audio_mask") is not None:
            src = aud if p["aud_index"] is None else aud.index_select(0, p["aud_index"])
            emb = emb.masked_scatter(p["audio_mask"][..., None], src.to(emb.dtype))
        out = self.llm(inputs_embeds=emb, attention_mask=p["mask"], position_ids=p["pos"], use_cache=False,
                       output_hidden_states=fusion)
        if fusion:
            last = torch.cat([h[:, -1] for h in out.hidden_states[1:]], dim=-1)
            z = self.classify_linear(last.to(self.classify_linear[0].weight.dtype))
        else:
            z = out.last_hidden_state[:, -1]
        return F.normalize(z.float(), dim=-1)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


def build_wave(widths: dict, beats_cfg: dict, ids: Ids, *, lora_rank: int, lora_alpha: float, lora_dropout: float,
               device: str | torch.device = "cpu", frozen_dtype: torch.dtype = torch.float32,
               train_dtype: torch.dtype = torch.float32, text_fusion_head: bool = False,
               seed: int = 0) -> TorchWave:
    """Random-init WAVE built directly on ``device``; frozen base in ``frozen_dtype``, trainables in
    ``train_dtype``. On the meta device nothing is allocated (shape / parameter-count checks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    beats_mod = import_beats_encoder()
    torch.manual_seed(seed)
    cfg = thinker_config(widths, ids)
    with torch.device(device):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg, attn_implementation="sdpa",
                                                                          dtype=frozen_dtype)
        thinker.lm_head = nn.Identity()   # never run: the step pools hidden states, no logits
        # fbank_mean 0 / std 0.5 make ESPnet's (x - mean) / (2 std) the identity: the pipeline's
        # fbank is already normalised (omniret_jax.data.features.beats_fbank). Its sdpa path
        # (use_flash_attn) equals the eager one (checked to 1e-6); on CPU torch falls back to the
        # math kernel there and the eager path is ~20 % faster, so sdpa only on CUDA.
        # openbeats initialises through CPU tensors (data.cpu().normal_()), so BEATs (~90 M params
        # at iter3+ size) is built on the CPU and moved.
        sdpa = torch.device(device).type == "cuda"
        with torch.device("cpu"):
            beats = beats_mod.BeatsEncoder(input_size=1, beats_config=dict(beats_cfg, use_flash_attn=sdpa),
                                           fbank_mean=0.0, fbank_std=0.5)
        beats = beats.to(device=device, dtype=frozen_dtype)
        wave = TorchWave(thinker, beats, ids, text_fusion_head=text_fusion_head)
        for mod in (wave.classify_linear, wave.beats_ln, wave.beats_proj):
            mod.to(train_dtype)
    for p in wave.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                      target_modules=r".*language_model\.layers\.\d+\.self_attn\.(q|k|v)_proj")
    # peft injects LoRA layers into the thinker in place and freezes everything but them; its
    # default autocast_adapter_dtype keeps the adapters float32 over a bfloat16 base.
    peft_model = get_peft_model(thinker, lora)
    assert peft_model.base_model.model is thinker
    for name, p in thinker.named_parameters():
        p.requires_grad_("lora_" in name)
    for name, p in thinker.named_parameters():
        if "lora_" in name and p.dtype != train_dtype:
            p.data = p.data.to(train_dtype)
    for mod in (wave.classify_linear, wave.beats_ln, wave.beats_proj):
        for p in mod.parameters():
            p.requires_grad_(True)
    wave.beats.eval()
    return wave


def expected_trainable(widths: dict, beats_cfg: dict, rank: int) -> dict:
    """Parameter counts of LoRA r on q/k/v of every decoder layer + fusion head + BEATs adaptor."""
    t = widths["text"]
    d, n = t["hidden_size"], t["num_hidden_layers"]
    hd = d // t["num_attention_heads"]
    q_out, kv_out = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    lora = n * rank * ((d + q_out) + 2 * (d + kv_out))
    head = (n * d * d + d) + (d * d + d)
    c = beats_cfg["encoder_embed_dim"]
    adaptor = 2 * c + (c * d + d) + (d * d + d)
    return dict(lora=lora, head=head, adaptor=adaptor, total=lora + head + adaptor)


# ----------------------------------------------------------------------------- losses


def info_nce(x: torch.Tensor, y: torch.Tensor, tau: float, neg: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; ``neg`` (one row per sample) adds one logit column per direction."""
    labels = torch.arange(x.shape[0], device=x.device)
    logits = x @ y.T / tau
    lx, ly = logits, logits.T
    if neg is not None:
        lx = torch.cat([lx, (x * neg).sum(-1, keepdim=True) / tau], dim=1)
        ly = torch.cat([ly, (y * neg).sum(-1, keepdim=True) / tau], dim=1)
    return 0.5 * (F.cross_entropy(lx, labels) + F.cross_entropy(ly, labels))


def paper_loss(z: dict, tau: float, w=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, dict]:
    """L_A + L_D + L_T of method.md's paper recipe (full preset, joint tuple similarity)."""
    l_a = (info_nce(z["T"], z["V"], tau) + info_nce(z["T"], z["A"], tau) + info_nce(z["V"], z["A"], tau)) / 3
    teacher = z["TVA"].detach()
    l_d = (info_nce(z["T"], teacher, tau) + info_nce(z["V"], teacher, tau) + info_nce(z["A"], teacher, tau)) / 3
    l_t = info_nce(z["TVA"], z["TVA_aug"], tau, neg=z["TVA_neg"].detach())
    total = w[0] * l_a + w[1] * l_d + w[2] * l_t
    return total, dict(L_A=l_a.detach(), L_D=l_d.detach(), L_T=l_t.detach())


# ----------------------------------------------------------------------------- host-side collation

SLOTS = ("text", "audio", "video")      # hard-negative slot, cycling with the step (period 3)


def derangement(rng: np.random.Generator, b: int) -> np.ndarray:
    if b < 2:
        raise ValueError("a derangement needs a batch of at least 2")
    while True:
        p = rng.permutation(b)
        if not np.any(p == np.arange(b)):
            return p


def whisper_tokens(mel_len: np.ndarray) -> np.ndarray:
    """N_w: Whisper tokens of a clip of ``mel_len`` mel frames (conv stride 2, then avg-pool 2)."""
    return ((mel_len - 1) // 2 + 1 - 2) // 2 + 1


class Collator:
    """Turns a pipeline-format numpy batch into the device inputs of the step (what a DataLoader
    worker would do). Position ids come from the thinker's ``get_rope_index``."""

    def __init__(self, wave: TorchWave, c, device: str | torch.device = "cpu"):
        self.rope = wave.thinker.model.get_rope_index
        self.merge = wave.thinker.config.vision_config.spatial_merge_size ** 2
        self.ids = wave.ids
        self.device = torch.device(device)
        self.prompts = dict(V=c.embed.video_prompt, A=c.embed.audio_prompt, AV=c.embed.av_prompt)

    def _t(self, x, dtype=None):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype).to(self.device, non_blocking=True)

    # -- per view ---------------------------------------------------------------------------
    def view(self, v: dict) -> dict:
        ids = self.ids
        b = len(v["caption"])
        grid = np.asarray(v["video_grid_thw"], np.int64)
        n_patch = grid.prod(1)
        patches = np.concatenate([v["video_patches"][i, : n_patch[i]] for i in range(b)])  # packed, as HF's processor
        mel_len = np.asarray(v["mel_len"], np.int64)
        t_mel = v["mel"].shape[2]
        n_w = whisper_tokens(mel_len)
        fb_len = np.asarray(v["fbank_len"], np.int64)
        t_fb = v["fbank"].shape[1]
        n_max = int(n_w.max())
        out = dict(
            patches=self._t(patches, torch.float32), grid=self._t(grid),
            mel=self._t(v["mel"], torch.float32),
            mel_mask=self._t((np.arange(t_mel)[None] < mel_len[:, None]).astype(np.int64)),
            fbank=self._t(v["fbank"], torch.float32),
            fbank_pad=self._t(np.arange(t_fb)[None] >= fb_len[:, None]),
            beats_len=2 * n_max, pool_keep=self._t(np.arange(n_max)[None] < n_w[:, None]),
        )
        meta = dict(b=b, grid=grid, spg=np.asarray(v["video_second_per_grid"], np.float32), n_v=n_patch // self.merge,
                    n_w=n_w, caption=[ids.encode(s) for s in v["caption"]])
        return out, meta

    # -- one pass -----------------------------------------------------------------------------
    def _pass(self, rows: list[list[int]], meta: dict, vsrc: np.ndarray | None, asrc: np.ndarray | None) -> dict:
        ids = self.ids
        b, s = len(rows), max(map(len, rows))
        tok = np.full((b, s), ids.pad, np.int64)
        mask = np.zeros((b, s), np.int64)
        for i, r in enumerate(rows):                          # LEFT padding
            tok[i, s - len(r):] = r
            mask[i, s - len(r):] = 1
        t_tok, t_mask = torch.from_numpy(tok), torch.from_numpy(mask)
        grid = torch.from_numpy(meta["grid"][vsrc]) if vsrc is not None else None
        spg = torch.from_numpy(meta["spg"][vsrc]) if vsrc is not None else None
        seqlens = torch.from_numpy(8 * meta["n_w"][asrc]) if asrc is not None else None  # WAVE's doubled run
        with torch.no_grad():
            pos, _ = self.rope(t_tok, None, grid, t_mask, False, seqlens, spg)
        p = dict(ids=self._t(tok), mask=self._t(mask), pos=self._t(pos.numpy()),
                 tokens_real=int(mask.sum()), tokens_padded=int(mask.size))
        p["video_mask"] = self._t(tok == ids.video) if vsrc is not None else None
        p["audio_mask"] = self._t(tok == ids.audio) if asrc is not None else None
        p["vis_index"] = self._gather(meta["n_v"], vsrc)
        p["aud_index"] = self._gather(2 * meta["n_w"], asrc)
        return p

    def _gather(self, lengths: np.ndarray, src: np.ndarray | None):
        if src is None or np.array_equal(src, np.arange(len(lengths))):
            return None
        off = np.concatenate([[0], np.cumsum(lengths)])
        return self._t(np.concatenate([np.arange(off[j], off[j + 1]) for j in src]))

    def _media(self, meta, i_v: int | None, i_a: int | None) -> list[int]:
        ids, r = self.ids, []
        if i_v is not None:
            r += [ids.vision_bos] + [ids.video] * int(meta["n_v"][i_v]) + [ids.vision_eos]
        if i_a is not None:
            r += [ids.audio_bos] + [ids.audio] * int(2 * meta["n_w"][i_a]) + [ids.audio_eos]
        return r

    def passes(self, meta: dict, names, perm: np.ndarray | None = None, slot: str | None = None) -> dict:
        ids, b = self.ids, meta["b"]
        ar = np.arange(b)
        cap = meta["caption"]
        out = {}
        for name in names:
            if name == "T":
                out[name] = self._pass([cap[i] + [ids.im_end] for i in ar], meta, None, None)
            elif name in ("V", "A", "AV"):
                prompt = ids.encode(self.prompts[name])
                rows = [self._media(meta, i if "V" in name else None, i if "A" in name else None)
                        + prompt + [ids.im_end] for i in ar]
                out[name] = self._pass(rows, meta, ar if "V" in name else None, ar if "A" in name else None)
            elif name == "TVA":
                out[name] = self._pass([self._media(meta, i, i) + cap[i] + [ids.im_end] for i in ar], meta, ar, ar)
            elif name == "TVA_neg":
                t_src, a_src, v_src = (perm if slot == "text" else ar, perm if slot == "audio" else ar,
                                       perm if slot == "video" else ar)
                rows = [self._media(meta, v_src[i], a_src[i]) + cap[t_src[i]] + [ids.im_end] for i in ar]
                out[name] = self._pass(rows, meta, v_src, a_src)
            else:
                raise ValueError(f"unknown pass {name!r}")
        return out

    def train_inputs(self, batch: dict, step: int, seed: int = 0) -> dict:
        """Everything one step of the full paper recipe needs (slot and derangement depend on the step)."""
        anchor, meta = self.view(batch)
        aug, meta_aug = self.view(batch["aug"])
        slot = SLOTS[step % 3]
        perm = derangement(np.random.default_rng((seed, step)), meta["b"])
        passes = self.passes(meta, ("T", "V", "A", "TVA"))
        passes["TVA_neg"] = self.passes(meta, ("TVA_neg",), perm, slot)["TVA_neg"]
        passes["TVA_aug"] = self.passes(meta_aug, ("TVA",))["TVA"]
        return dict(anchor=anchor, aug=aug, passes=passes, slot=slot, perm=perm)


def pack_single(v: dict, i: int) -> dict:
    """Row ``i`` of a view alone, with every padding trimmed (the per-sample reference input)."""
    n_p = int(np.prod(v["video_grid_thw"][i]))
    ml, fl = int(v["mel_len"][i]), int(v["fbank_len"][i])
    return {
        "caption": [v["caption"][i]],
        "video_patches": v["video_patches"][i: i + 1, :n_p],
        "video_grid_thw": v["video_grid_thw"][i: i + 1],
        "video_second_per_grid": v["video_second_per_grid"][i: i + 1],
        "mel": v["mel"][i: i + 1, :, :ml], "mel_len": v["mel_len"][i: i + 1],
        "fbank": v["fbank"][i: i + 1, :fl], "fbank_len": v["fbank_len"][i: i + 1],
    }


def mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def count(params) -> int:
    return sum(math.prod(p.shape) for p in params)
