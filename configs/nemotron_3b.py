"""Omni-Embed-Nemotron-3B + LoRA on q/k/v/o, trained with OmniRetriever's recipe (paper Appendix L).

The cross-backbone row of Table S13 (AVG-all R@1 on OmniRetriever-Bench: frozen 26.81, pairwise 29.42,
+ L_D 31.85, full 32.18). The config argument picks the preset: frozen | pairwise | distill | full.

Known (paper Appendix L; the checkpoint's modeling file and model-card usage, see configs/common.nemotron):
- backbone nvidia/omni-embed-nemotron-3b: the Qwen2.5-Omni-3B thinker (text hidden 2048, 36 layers, 16 heads /
  2 KV heads, intermediate 11008, vocab 151936; ViT and Whisper towers, no talker), every decoder layer
  bidirectional, masked mean pool of the final hidden state, L2-normalised (D = 2048); no fusion head, no BEATs;
  audio and video as separate streams; prefixes "query: " / "passage: ";
- trained: LoRA on q/k/v/o of every LLM decoder layer (4 x 36 = 144 matrices), nothing else; the same training
  corpus as OmniRetriever-7B; the three trained presets are L_A, L_A + L_D, L_A + L_D + L_T.
Assumed (the seed paper's numbers are stripped or silent here): LoRA rank 16 / alpha 32 / dropout 0.05 ("matching
the LoRA budget used on WAVE-7B", as Table S1 gives it), temperature 0.01 and loss weights (1, 1, 1) as for WAVE,
and the 7B config's data, optimizer, batch (global 64) and length (one epoch) settings: the paper calls the run
"short" without a step count, so set --config.train.steps for a shorter one. The fusion teacher of L_D / L_T is the
joint TVA embedding, mean-pooled like every path. The chat template's system turn is Qwen's default (unverified for
this checkpoint). The checkpoint's config.json ("nvomniembed") and flat keys load with
omniret_jax.convert.to_flax.load_thinker (key layout "nemotron").

COMMAND: python -m omniret_jax.train --config configs/nemotron_3b.py --workdir /ckpt/nemotron --config.model.checkpoint=/weights/omni-embed-nemotron-3b --config.data.manifest=/data/train.jsonl
COMMAND: python -m omniret_jax.eval --config configs/nemotron_3b.py:full --checkpoint /ckpt/nemotron --manifest /data/bench.jsonl --out /ckpt/nemotron/eval --config.model.checkpoint=/weights/omni-embed-nemotron-3b
"""

import ml_collections

from configs import common, omniretriever_7b


def get_config(preset: str = "full") -> ml_collections.ConfigDict:
    c = common.nemotron(omniretriever_7b.get_config(preset))
    c.model.size = "3b"                # random init without a checkpoint (benchmarks): the 3B shapes
    return c
