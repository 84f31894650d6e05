"""Peak host memory of checkpoint conversion at the real 7B widths.

Writes a synthetic Qwen2.5-Omni checkpoint in the released layout (``thinker.*``
plus ``talker.*`` keys the converter must skip), bfloat16, sharded with an index,
with the 7B widths (hidden 3584, vocab 152064, vision 1280, audio 1280) but 2
layers per tower; then runs ``omniret-convert`` under ``/usr/bin/time -v`` and
compares its peak RSS with the size of the converted parameters. The loader
streams if peak RSS <= converted size + largest tensor + 1 GiB.

COMMAND: python bench/convert_memory.py --work /tmp/convert_bench [--param-dtype bfloat16]
Needs torch (the test extra) to build the synthetic checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30


def make_checkpoint(out: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(num_hidden_layers=layers),  # 7B widths are the defaults
        vision_config=dict(depth=layers, hidden_size=1280, out_hidden_size=3584, fullatt_block_indexes=[layers - 1]),
        audio_config=dict(encoder_layers=layers),
        vision_start_token_id=151652, vision_end_token_id=151653,
    )
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rename = [("model.language_model.", "thinker.model."), ("model.visual.", "thinker.visual."),
              ("model.audio_tower.", "thinker.audio_tower."), ("lm_head.", "thinker.lm_head.")]

    def released(key: str) -> str:
        for a, b in rename:
            if key.startswith(a):
                return b + key[len(a):]
        raise KeyError(key)

    # Shard like the release: big tables alone, the rest grouped.
    groups: dict[str, list[str]] = {"embed": [], "head": [], "rest": []}
    for k in shapes:
        groups["embed" if "embed_tokens" in k else "head" if k.startswith("lm_head") else "rest"].append(k)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for i, (name, keys) in enumerate(groups.items()):
        fname = f"model-{i + 1:05d}-of-{len(groups) + 1:05d}.safetensors"
        tensors = {released(k): (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16) for k in keys}
        save_file(tensors, str(out / fname))
        weight_map.update({k: fname for k in tensors})
        del tensors
    talker = f"model-{len(groups) + 1:05d}-of-{len(groups) + 1:05d}.safetensors"
    save_file({"talker.model.norm.weight": torch.ones(896, dtype=torch.bfloat16),
               "token2wav.code_embedding.weight": torch.zeros(8, 4, dtype=torch.bfloat16)}, str(out / talker))
    weight_map.update({"talker.model.norm.weight": talker, "token2wav.code_embedding.weight": talker})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": cfg.to_dict()}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/convert_bench"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    src, dst = args.work / "hf", args.work / "flax"
    if not (src / "model.safetensors.index.json").exists():
        t = time.time()
        make_checkpoint(src, args.layers)
        print(f"synthetic checkpoint written in {time.time() - t:.0f} s")
    shutil.rmtree(dst, ignore_errors=True)

    from omniret_jax.convert.tensors import TensorSource
    from omniret_jax.config import dtype_from_name
    import numpy as np

    source = TensorSource(src)
    itemsize = np.dtype(dtype_from_name(args.param_dtype)).itemsize
    keys = [k for k in source.keys() if k.startswith("thinker.")]
    sizes = {k: int(np.prod(source.shape(k))) * itemsize for k in keys}
    converted, largest = sum(sizes.values()), max(sizes.values())

    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "omniret_jax.convert.cli", "--src", str(src),
           "--out", str(dst), "--param-dtype", args.param_dtype]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
    wall = time.time() - t
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        return proc.returncode
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    peak = rss_kb * 1024
    budget = converted + largest + GiB
    print([line for line in proc.stdout.splitlines() if line.startswith("converted")][0])
    print(f"converted parameters: {converted / GiB:.2f} GiB ({args.param_dtype}); largest tensor {largest / GiB:.2f} GiB")
    print(f"peak RSS: {peak / GiB:.2f} GiB; budget (converted + largest + 1 GiB): {budget / GiB:.2f} GiB; "
          f"wall {wall:.0f} s -> {'OK' if peak <= budget else 'OVER BUDGET'}")
    return 0 if peak <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
