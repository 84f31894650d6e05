"""A PyTorch WAVE written from architecture.md sections 2-3 (not from our JAX code).

transformers' Qwen2.5-Omni thinker + openbeats' BEATs (ESPnet BeatsEncoder, through
tests/torchaudio_stub.py) + torch modules for WAVE's heads: ``classify_linear``
(Linear-GELU-Linear over the concatenated last-token states of every layer), ``beats_ln``
(LayerNorm) and ``beats_proj`` (Linear-GELU-Linear). The thinker's modules sit under
``model`` exactly as in ``Qwen2_5OmniThinkerForConditionalGeneration`` and the heads at the
top level, as in WAVE's own thinker class, so PEFT adapters (LoRA targets
``model.language_model.layers.N.self_attn.q_proj``, ``modules_to_save`` = the heads) load
onto it by name.

``embed`` runs one sample alone and unpadded: BEATs on the sample's own fbank frames, its
tokens cut or zero-padded to 2 * N_w, pooled in pairs, adapted and interleaved with the
Whisper tokens; position ids from transformers' ``get_rope_index``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tests.torchaudio_stub import import_beats_encoder

HEADS = ("classify_linear", "beats_ln", "beats_proj")
ESPNET_ONLY = ("patch_embedding_pad.weight", "raw2fbank_pad.weight")
SPEC_PROMPTS = {"V": "Please describe the video.", "A": "Please describe the audio.",
                "AV": "Please describe the video and the audio."}


def _mlp(d_in: int, d_hidden: int, d_out: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.GELU(), torch.nn.Linear(d_hidden, d_out))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded with an index)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(path / name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


class TorchWave(torch.nn.Module):
    def __init__(self, thinker, beats_config: dict):
        super().__init__()
        cfg = thinker.config
        self.model = thinker.model
        d, layers = cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers
        c, audio_out = beats_config["encoder_embed_dim"], cfg.audio_config.output_dim
        self.beats = import_beats_encoder().BeatsEncoder(input_size=1, beats_config=beats_config, fbank_mean=0.0,
                                                         fbank_std=0.5)
        self.classify_linear = _mlp(d * layers, d, d)
        self.beats_ln = torch.nn.LayerNorm(c)
        self.beats_proj = _mlp(c, audio_out, audio_out)
        self.ids = dict(video=cfg.video_token_index, audio=cfg.audio_token_index,
                        vision_bos=cfg.vision_start_token_id, vision_eos=cfg.vision_end_token_id,
                        audio_bos=cfg.audio_start_token_id, audio_eos=cfg.audio_end_token_id)
        self.merge = cfg.vision_config.spatial_merge_size
        self.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "TorchWave":
        """A WAVE checkpoint directory as a PyTorch user loads it: the thinker with transformers'
        ``from_pretrained`` (float32), BEATs and the heads from their ``beats.*`` / head keys."""
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        path = Path(path)
        thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        wave = cls(thinker, json.loads((path / "config.json").read_text())["beats_config"])
        sd = read_safetensors(path)
        for name in HEADS:
            getattr(wave, name).load_state_dict({k[len(name) + 1:]: v.float() for k, v in sd.items()
                                                 if k.startswith(name + ".")})
        beats = {k[len("beats."):]: v.float() for k, v in sd.items() if k.startswith("beats.")}
        missing, unexpected = wave.beats.load_state_dict(beats, strict=False)
        assert not unexpected and set(missing) <= set(ESPNET_ONLY), (missing, unexpected)
        return wave.eval()

    # -- the reference embedding of one sample ------------------------------------------
    @torch.no_grad()
    def embed(self, path: str, s: dict, *, encode: Callable[[str], list[int]], im_end: int,
              prompts: dict[str, str] = SPEC_PROMPTS, text_fusion_head: bool = False) -> np.ndarray:
        """Unit-norm embedding of sample ``s`` (caption, grid, spg, patches, mel, mel_len, fbank,
        fbank_len) on path T, V, A, AV, TV, TA or TVA."""
        m, ids_of = self.model, self.ids
        if path == "T":
            ids = torch.tensor([encode(s["caption"]) + [im_end]])
            out = m.language_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            if not text_fusion_head:
                return torch.nn.functional.normalize(out.last_hidden_state[:, -1], dim=-1)[0].numpy()
            fused = self.classify_linear(torch.cat([h[:, -1] for h in out.hidden_states[1:]], dim=-1))
            return torch.nn.functional.normalize(fused, dim=-1)[0].numpy()
        ids, n_v, n_w = [], 0, 0
        if "V" in path:
            n_v = int(np.prod(s["grid"])) // self.merge**2
            ids += [ids_of["vision_bos"]] + [ids_of["video"]] * n_v + [ids_of["vision_eos"]]
        if "A" in path:
            n_w = ((s["mel_len"] - 1) // 2 + 1 - 2) // 2 + 1
            ids += [ids_of["audio_bos"]] + [ids_of["audio"]] * (2 * n_w) + [ids_of["audio_eos"]]
        prompt = s["caption"] if "T" in path else prompts[path]
        ids = torch.tensor([ids + encode(prompt) + [im_end]])
        mask = torch.ones_like(ids)
        emb = m.get_input_embeddings()(ids)
        grid = spg = None
        if "V" in path:
            grid = torch.tensor([list(s["grid"])])
            spg = torch.tensor([float(s["spg"])])
            patches = torch.from_numpy(np.asarray(s["patches"], np.float32)[: int(np.prod(s["grid"]))])
            feats = m.get_video_features(patches, grid).pooler_output
            emb[ids == ids_of["video"]] = torch.cat(feats).to(emb.dtype)
        audio_seqlens = None
        if "A" in path:
            mel = torch.from_numpy(np.asarray(s["mel"], np.float32)[None, :, : s["mel_len"]])
            whisper = m.get_audio_features(mel, feature_attention_mask=torch.ones(1, s["mel_len"],
                                                                                  dtype=torch.long)).last_hidden_state
            fb = torch.from_numpy(np.asarray(s["fbank"], np.float32)[None, : s["fbank_len"]])
            tok = self.beats.extract_features(fb, None, skip_fbank_extraction=True)[0][0]
            tok = tok[: 2 * n_w] if len(tok) >= 2 * n_w else torch.nn.functional.pad(tok, (0, 0, 0, 2 * n_w - len(tok)))
            pooled = torch.nn.functional.avg_pool1d(tok.T[None], 2, 2)[0].T
            beats = self.beats_proj(self.beats_ln(pooled))
            emb[ids == ids_of["audio"]] = torch.stack([whisper, beats], dim=1).reshape(2 * n_w, -1).to(emb.dtype)
            # WAVE gives the doubled run consecutive positions; transformers does the same
            # for an audio whose mel length yields 2 * N_w tokens, i.e. 8 * N_w frames.
            audio_seqlens = torch.tensor([8 * n_w])
        pos, _ = m.get_rope_index(ids, None, grid, mask, False, audio_seqlens, spg)
        out = m.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        fused = self.classify_linear(torch.cat([h[:, -1] for h in out.hidden_states[1:]], dim=-1))
        return torch.nn.functional.normalize(fused, dim=-1)[0].numpy()


# -- clips in the input pipeline's batch format, one dict per clip, and their .npz form ----------

_CLIP_KEYS = ("caption", "grid", "spg", "patches", "mel", "mel_len", "fbank", "fbank_len")


def clip_samples(batch: dict) -> list[dict]:
    """Per-clip dicts (``embed``'s ``s``) from a pipeline batch (caption list, padded arrays)."""
    return [dict(caption=batch["caption"][i], grid=tuple(int(x) for x in batch["video_grid_thw"][i]),
                 spg=float(batch["video_second_per_grid"][i]), patches=np.asarray(batch["video_patches"][i]),
                 mel=np.asarray(batch["mel"][i]), mel_len=int(batch["mel_len"][i]), fbank=np.asarray(batch["fbank"][i]),
                 fbank_len=int(batch["fbank_len"][i]))
            for i in range(len(batch["caption"]))]


def save_clips(path: str | Path, samples: list[dict]) -> None:
    np.savez(path, n=len(samples), **{f"{i}.{k}": np.asarray(s[k]) for i, s in enumerate(samples) for k in _CLIP_KEYS})


def load_clips(path: str | Path) -> list[dict]:
    with np.load(path) as z:
        out = []
        for i in range(int(z["n"])):
            s = {k: z[f"{i}.{k}"] for k in _CLIP_KEYS}
            s["caption"] = str(s["caption"])
            s["grid"] = tuple(int(x) for x in s["grid"])
            s["spg"], s["mel_len"], s["fbank_len"] = float(s["spg"]), int(s["mel_len"]), int(s["fbank_len"])
            out.append(s)
    return out
