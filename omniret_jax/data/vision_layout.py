"""Vision tower index arrays for a padded batch, computed on the host (NumPy).

Each sample is one row of ``P`` patches (its images and video clips in the processor's
order, zero-padded). The window permutation, 2-D rotary positions and attention segments
of the Qwen2.5-VL ViT depend on the grids, so they are decided here and handed to the
tower as a ``VisionLayout`` of fixed shapes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from omniret_jax.config import VisionConfig
from omniret_jax.inputs import VisionLayout


def _check_grid(grid, where: str, merge: int) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: grid_thw must be three integers (t, h, w), got {grid!r}") from None
    if min(t, h, w) < 1:
        raise ValueError(f"{where}: grid_thw {(t, h, w)} must be positive")
    if h % merge or w % merge:
        raise ValueError(f"{where}: grid_thw {(t, h, w)} has h/w not divisible by "
                         f"spatial_merge_size={merge}")
    return t, h, w


def _sample_layout(grids: Sequence[tuple[int, int, int]], merge: int, window: int):
    """Original-order per-unit arrays for one sample, plus its window permutation."""
    unit_hw, unit_frame, unit_window, perm = [], [], [], []
    units = frames = windows = 0
    in_block_h, in_block_w = np.divmod(np.arange(merge * merge), merge)
    for t, h, w in grids:
        lh, lw = h // merge, w // merge
        # Patch (row, col) for each merge unit's m*m patches, frame-major like the processor.
        bh, bw = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
        rows = (bh.reshape(-1, 1) * merge + in_block_h).reshape(-1)
        cols = (bw.reshape(-1, 1) * merge + in_block_w).reshape(-1)
        unit_hw.append(np.tile(np.stack([rows, cols], -1).reshape(lh * lw, merge * merge, 2), (t, 1, 1)))
        ft, fh, fw = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        nwh, nww = -(-lh // window), -(-lw // window)
        win = (ft * nwh * nww + (fh // window) * nww + fw // window).reshape(-1)
        # Stable sort keeps raster order inside each window, matching the reference.
        perm.append(np.argsort(win, kind="stable") + units)
        unit_window.append(win + windows)
        unit_frame.append(ft.reshape(-1) + frames)
        units += t * lh * lw
        frames += t
        windows += t * nwh * nww
    if not grids:
        empty = np.zeros((0,), np.int64)
        return np.zeros((0, merge * merge, 2), np.int64), empty, empty, empty
    return (np.concatenate(unit_hw), np.concatenate(unit_frame), np.concatenate(unit_window),
            np.concatenate(perm))


def vision_layout(grids_per_sample: Sequence[Sequence[Sequence[int]]], max_patches: int,
                  cfg: VisionConfig) -> VisionLayout:
    """Host-side (NumPy) layout for a batch; sample i holds the grids ``grids_per_sample[i]``.

    ``max_patches`` is the padded patch count P of every row; it must be a
    multiple of spatial_merge_size**2 and hold each sample's sum of t*h*w.
    """
    merge = cfg.spatial_merge_size
    unit = merge * merge
    window = cfg.window_size // merge // cfg.patch_size
    if window < 1:
        raise ValueError(f"window_size={cfg.window_size} is smaller than one merge unit "
                         f"({merge} x {cfg.patch_size} px)")
    if not grids_per_sample:
        raise ValueError("grids_per_sample is empty: need at least one sample (row)")
    if max_patches <= 0 or max_patches % unit:
        raise ValueError(f"max_patches={max_patches} must be a positive multiple of "
                         f"spatial_merge_size**2={unit}")
    n_units = max_patches // unit
    b = len(grids_per_sample)
    win_idx = np.tile(np.arange(n_units, dtype=np.int32), (b, 1))
    inv_idx = win_idx.copy()
    pos = np.zeros((b, max_patches, 2), np.int32)
    full_seg = np.full((b, max_patches), -1, np.int32)
    win_seg = np.full((b, max_patches), -1, np.int32)
    valid = np.zeros((b, max_patches), bool)
    for i, grids in enumerate(grids_per_sample):
        grids = [_check_grid(g, f"sample {i} grid {j}", merge) for j, g in enumerate(grids)]
        total = sum(t * h * w for t, h, w in grids)
        if total > max_patches:
            raise ValueError(f"sample {i}: grids {grids} hold {total} patches but max_patches="
                             f"{max_patches}; raise max_patches (the padded P)")
        hw, frame, win, perm = _sample_layout(grids, merge, window)
        n = len(perm)
        win_idx[i, :n] = perm
        inv_idx[i, perm] = np.arange(n)
        # Per-unit -> per-patch, then into window order.
        pos[i, : n * unit] = hw[perm].reshape(-1, 2)
        full_seg[i, : n * unit] = np.repeat(frame[perm], unit)
        win_seg[i, : n * unit] = np.repeat(win[perm], unit)
        valid[i, : n * unit] = True
    return VisionLayout(window_index=win_idx, inverse_index=inv_idx, position_ids=pos,
                        full_segments=full_seg, window_segments=win_seg, valid=valid)
