#!/usr/bin/env bash
# The 7B-shape train step on one H100/H200, our side and the PyTorch side, in under 8 minutes.
#
# Both sides build the real WAVE-7B shapes (Qwen2.5-Omni-7B thinker + BEATs iter3+) with random
# weights directly on the GPU, frozen base bfloat16, trainables float32, batch 8, per-layer remat,
# the same random batch (8 frames at 224x224, 8 s of audio), and print one JSON line each:
# median step seconds, examples/s, MFU on real tokens, step memory. The ratio is printed last.
#
# Needs jax with CUDA, flax, optax, orbax, torch, transformers and peft (the lent H200 image has
# them) plus the packages it lacks: grain, av, librosa (and its deps), ml_collections, openbeats,
# tensorboardX. Put their wheels in .whl/ first (see /work/.library/device/README.md); this
# script installs whatever .whl/ holds. Untested on a GPU in the session that wrote it.
#
# COMMAND: bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"

# Ours: the 7B config at random init; 3 timed steps after 1 warm-up (the first compiles).
timeout 300 python3 bench/train_step.py --config configs/omniretriever_7b.py --config.model.init=random \
  --config.model.attention=cudnn --batch 8 --steps 3 --warmup 1 --json "$OUT/jax.json" 2>&1 | tail -n 14
# PyTorch: transformers thinker + peft + openbeats at the same shapes.
timeout 240 python3 bench/torch_reference_step.py --widths 7b --device cuda --steps 3 --warmup 1 \
  > "$OUT/torch.json" 2> "$OUT/torch.log" || { tail -n 30 "$OUT/torch.log"; exit 1; }
tail -n 1 "$OUT/torch.json"
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
ours = json.loads(open(f"{out}/jax.json").read())
theirs = json.loads(open(f"{out}/torch.json").read().strip().splitlines()[-1])
print(f"ours {ours['median_s']:.3f} s/step ({ours['examples_per_s']:.2f} ex/s, MFU {100 * ours['mfu']:.1f} % on real "
      f"tokens); PyTorch {theirs['median_s']:.3f} s/step ({theirs['examples_per_s']:.2f} ex/s); "
      f"examples/s ours / PyTorch = {ours['examples_per_s'] / theirs['examples_per_s']:.2f}")
EOF
