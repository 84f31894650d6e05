"""Convert a PyTorch Qwen2.5-Omni checkpoint to an orbax checkpoint of the Flax thinker.

COMMAND: python convert/hf_to_orbax.py --src /path/to/Qwen2.5-Omni-7B --out /path/to/flax_ckpt
(the same as the installed ``omniret-convert`` entry point).
"""

import sys

from omniret_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
