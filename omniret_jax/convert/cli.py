"""``omniret-convert``: PyTorch Qwen2.5-Omni (or Qwen2.5-VL) checkpoint -> orbax checkpoint of the Flax backbone.

COMMAND: omniret-convert --src /path/to/Qwen2.5-Omni-7B --out /path/to/flax_ckpt --param-dtype bfloat16
COMMAND: omniret-convert --src /path/to/Qwen2.5-VL-7B-Instruct --out /path/to/flax_vl --param-dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys

from omniret_jax.config import Precision
from omniret_jax.convert.orbax_io import save_module
from omniret_jax.convert.to_flax import FAMILY_LAYOUTS, load_backbone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory (must not hold a checkpoint yet)")
    p.add_argument("--param-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layout", default=None, choices=sorted(sum(FAMILY_LAYOUTS.values(), ())),
                   help="key layout (default: detected)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept PyTorch .bin pickles (loaded with torch.load(weights_only=True))")
    args = p.parse_args(argv)
    model, report = load_backbone(args.src, precision=Precision.from_names(frozen=args.param_dtype), layout=args.layout,
                                  allow_pickle=args.allow_pickle)
    out = save_module(model, args.out, args.src)
    ignored = ", ".join(f"{k}* ({n})" for k, n in report.ignored.items()) or "none"
    print(f"converted {report.loaded} tensors ({report.nbytes / 2**30:.2f} GiB, layout {report.layout}); "
          f"ignored: {ignored}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
