"""The bottom layer's other half: the fixed-shape arrays the host hands the device.

``omniret_jax.data`` fills these containers with NumPy arrays; ``omniret_jax.model`` reads
them under jit. They are pytrees (every array field is a leaf, batch-first so every input
shards on axis 0), so a whole step's inputs cross ``jax.jit`` and ``device_put`` as one tree.

The field annotations are the shape contract (jaxtyping: names shared by the fields of one
container must agree). Constructing a container checks it when a type checker is installed
(the test suite installs beartype through jaxtyping's hook); JAX's transforms rebuild the
containers with tracers, shardings or abstract values without going through ``__init__``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int

# Where a token's input embedding comes from (``PathInputs.source``).
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3
# The letter of each media kind in a path name ("TI": text + image; ``config.EMBED_PATHS``).
PATH_LETTER = {IMAGE: "I", VIDEO: "V", AUDIO: "A"}

# Host (NumPy, as built by omniret_jax.data) or device arrays.
Arr = np.ndarray | Array


def _pytree(cls):
    """Register a dataclass as a pytree (every field a child) whose unflatten skips ``__init__``."""
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flatten_with_keys(x):
        return tuple((jax.tree_util.GetAttrKey(n), getattr(x, n)) for n in names), None

    def unflatten(_, children):
        obj = object.__new__(cls)
        for n, v in zip(names, children):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten,
                                            flatten_func=lambda x: (tuple(getattr(x, n) for n in names), None))
    return cls


@_pytree
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

    window_index: Int[Arr, "b u"]
    inverse_index: Int[Arr, "b u"]
    position_ids: Int[Arr, "b p 2"]
    full_segments: Int[Arr, "b p"]
    window_segments: Int[Arr, "b p"]
    valid: Bool[Arr, "b p"]


@_pytree
@dataclasses.dataclass(frozen=True)
class PathInputs:
    """One LLM pass (one embedding path): the B sequences of a batch in R rows of S tokens.

    Unpacked, R = B and row b holds sequence b; packed, a row holds several consecutive
    sequences, told apart by ``attention_mask`` (their segment ids 1, 2, ...; 0 = padding), with
    positions restarting in each.
    """
    input_ids: Int[Arr, "r s"]
    attention_mask: Int[Arr, "r s"]    # 0 = padding, else the segment id (1 in an unpacked row)
    position_ids: Int[Arr, "r 3 s"]    # M-RoPE (t, h, w) positions
    source: Int[Arr, "r s"]            # TEXT / IMAGE / VIDEO / AUDIO
    index: Int[Arr, "r s"]             # row of the flattened tower output a media token takes
    pool_index: Int[Arr, "b"]          # each sequence's last real token, flat into R * S (mean pools find it from there)


@_pytree
@dataclasses.dataclass(frozen=True)
class EmbedInputs:
    """Every path of one view of a batch plus the tower inputs they share."""
    paths: dict[str, PathInputs]
    video_patches: Float[Arr, "b p f"] | None = None     # f = C * Tp * patch**2
    video_layout: VisionLayout | None = None
    image_patches: Float[Arr, "b q f"] | None = None     # one image per row (the I / TI paths)
    image_layout: VisionLayout | None = None
    mel: Float[Arr, "b m t"] | None = None               # Whisper log-mel
    mel_lens: Int[Arr, "b"] | None = None
    fbank: Float[Arr, "b tb nf"] | None = None           # BEATs fbank, tb a multiple of 16
    fbank_padding: Bool[Arr, "b tb"] | None = None       # True = padded frame


@_pytree
@dataclasses.dataclass(frozen=True)
class TrainInputs:
    """One train step: the anchor view, the augmented view, the hard-negative tuple, and the
    view of each record's reference clip when a text + video query embeds it (``query``).

    The tuple's TVA pass either reuses the anchor's tower outputs, rows permuted by
    ``neg_rows`` (``neg``: its token layout only), or runs the towers on its own swapped media
    (``neg_view``: a whole view, what a chunked step needs, where the rows a negative borrows
    may sit in another chunk).
    """
    anchor: EmbedInputs
    aug: EmbedInputs | None = None
    neg: PathInputs | None = None             # TVA layout of the hard-negative tuple
    neg_rows: Int[Arr, "b 3"] | None = None   # text / video / audio source row of each negative
    neg_view: EmbedInputs | None = None       # the tuple as a view of its own (paths {"TVA"})
    query: EmbedInputs | None = None          # each record's reference clip (a text + video query: tv2v)
