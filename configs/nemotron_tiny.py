"""Tiny random-init Omni-Embed-Nemotron trained on CPU on the synthetic corpus.

The widths, data and optimizer settings of configs/tiny.py on the Nemotron backbone (configs/common.nemotron):
bidirectional thinker, masked mean pool, Whisper only, the chat-template turn with "query: " / "passage: ",
LoRA on q/k/v/o only. The config argument picks the ablation preset: frozen | pairwise | distill | full.

COMMAND: python -m omniret_jax.train --config configs/nemotron_tiny.py --workdir /tmp/nemotron
COMMAND: python -m omniret_jax.eval --config configs/nemotron_tiny.py --checkpoint /tmp/nemotron --manifest /tmp/nemotron/corpus/manifest.jsonl --out /tmp/nemotron/eval
"""

import ml_collections

from configs import common, tiny


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    return common.nemotron(tiny.get_config(preset))
