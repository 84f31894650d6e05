"""The bottom layer's other half: the fixed-shape arrays the host hands the device.

``omniret_jax.data`` fills these containers with NumPy arrays; ``omniret_jax.model`` reads
them under jit. They are pytrees (every array field is a leaf, batch-first so every input
shards on axis 0), so a whole step's inputs cross ``jax.jit`` and ``device_put`` as one tree.
"""

from __future__ import annotations

import dataclasses

import jax

# Where a token's input embedding comes from (``PathInputs.source``).
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Index arrays for one padded batch; U = P // spatial_merge_size**2 merge units.

    window_index:  [B, U] int32, window-order slot -> original merge unit.
    inverse_index: [B, U] int32, original merge unit -> window-order slot.
    position_ids:  [B, P, 2] int32 (row, column) of each patch, in window order.
    full_segments: [B, P] int32 one id per frame (image, or video temporal step),
                   window order; -1 on padding. Used by full-attention blocks.
    window_segments: [B, P] int32 one id per attention window, window order; -1 on padding.
    valid:         [B, P] bool real patches. Padding sits at the tail of each row
                   in both orders, so one mask serves both.
    """

    window_index: jax.Array
    inverse_index: jax.Array
    position_ids: jax.Array
    full_segments: jax.Array
    window_segments: jax.Array
    valid: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PathInputs:
    """One LLM pass (one embedding path) over a batch of rows."""
    input_ids: jax.Array       # [B, S]
    attention_mask: jax.Array  # [B, S]
    position_ids: jax.Array    # [B, 3, S] M-RoPE (t, h, w) positions
    source: jax.Array          # [B, S] TEXT / IMAGE / VIDEO / AUDIO
    index: jax.Array           # [B, S] row of the flattened tower output a media token takes
    last_index: jax.Array      # [B] the pooled (last real) token


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EmbedInputs:
    """Every path of one view of a batch plus the tower inputs they share."""
    paths: dict[str, PathInputs]
    video_patches: jax.Array | None = None    # [B, P, C*Tp*p*p]
    video_layout: VisionLayout | None = None
    mel: jax.Array | None = None              # [B, n_mels, T]
    mel_lens: jax.Array | None = None         # [B]
    fbank: jax.Array | None = None            # [B, T_b, 128], T_b a multiple of 16
    fbank_padding: jax.Array | None = None    # [B, T_b] True = padded frame


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainInputs:
    """One train step: the anchor view, the augmented view, the hard-negative tuple."""
    anchor: EmbedInputs
    aug: EmbedInputs | None = None
    neg: PathInputs | None = None      # TVA layout of the hard-negative tuple
    neg_rows: jax.Array | None = None  # [B, 3]: text / video / audio source row of each negative
