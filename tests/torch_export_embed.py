"""What a PyTorch user does with ``omniret-convert export``: load and embed, in a process of its own.

    python -m tests.torch_export_embed --export DIR --clips clips.npz --out emb.npz [--paths T,V,A,TVA]
        [--merged-paths TVA] [--base-paths T]

Loads DIR/base (or the run's own base, as export.json says) with transformers, BEATs and the
heads (tests/torch_wave.py, written from the spec), puts DIR/adapter on it with
``peft.PeftModel.from_pretrained`` and embeds every clip on ``--paths``; ``--merged-paths``
embeds them with DIR/merged (keys ``merged/<path>``), ``--base-paths`` with the base alone,
before the adapter goes on (``base/<path>``). Token ids: the
random-init runs' byte tokenizer (UTF-8 bytes + 1; ``<|im_end|>`` is 307 in the tiny
vocabulary, data/tokens.py, and 151645 in Qwen's, architecture.md section 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from omniret_jax.data.tokens import TINY_IM_END
from tests.torch_wave import HEADS, TorchWave, load_clips

QWEN_IM_END = 151645


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--export", type=Path, required=True)
    p.add_argument("--clips", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--paths", default="T,V,A,TVA")
    p.add_argument("--merged-paths", default="")
    p.add_argument("--base-paths", default="")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    from peft import PeftModel
    from peft.utils.other import ModulesToSaveWrapper

    info = json.loads((args.export / "export.json").read_text())
    assert info["tokenizer"] == "bytes", info["tokenizer"]
    embed_cfg = info["config"]["embed"]
    prompts = {"V": embed_cfg["video_prompt"], "A": embed_cfg["audio_prompt"], "AV": embed_cfg["av_prompt"]}
    base = args.export / info["base"] if not Path(info["base"]).is_absolute() else Path(info["base"])
    clips = load_clips(args.clips)

    def run(wave, paths: str) -> dict[str, np.ndarray]:
        vocab = wave.model.language_model.embed_tokens.num_embeddings
        im_end = QWEN_IM_END if vocab > QWEN_IM_END else TINY_IM_END
        kw = dict(encode=lambda s: [b + 1 for b in s.encode()], im_end=im_end, prompts=prompts,
                  text_fusion_head=embed_cfg["text_fusion_head"])
        return {path: np.stack([wave.embed(path, s, **kw) for s in clips]) for path in paths.split(",") if path}

    wave = TorchWave.from_checkpoint(base)
    out = {f"base/{k}": v for k, v in run(wave, args.base_paths).items()}  # before the adapter
    peft_model = PeftModel.from_pretrained(wave, str(args.export / info["adapter"])).eval()
    assert peft_model.base_model.model is wave
    for name in HEADS:  # the trained heads really replace the base's
        assert isinstance(getattr(wave, name), ModulesToSaveWrapper), name
    n_lora = sum(1 for n, _ in wave.named_modules() if n.endswith("lora_A"))
    assert n_lora == info["lora"]["modules"], (n_lora, info["lora"])
    out.update(run(wave, args.paths))
    del wave, peft_model
    if args.merged_paths:
        merged = TorchWave.from_checkpoint(args.export / info["merged"])
        out.update({f"merged/{k}": v for k, v in run(merged, args.merged_paths).items()})
    np.savez(args.out, **out)
    print(f"embedded {len(clips)} clips: {', '.join(sorted(out))}")


if __name__ == "__main__":
    main()
