"""Host-side layout of a Qwen2.5-VL turn: position ids vs transformers, and refused media.

``rope_index`` on a ``QwenVLConfig`` is compared for exact equality (every slot, padding
included, and the deltas) with ``Qwen2_5_VLModel.get_rope_index`` of transformers 5.24 on
the tiny model of tests/hf_tiny.py, given the processor's ``mm_token_type_ids`` and
``second_per_grid_ts`` as a float32 tensor. 5.24's rules, which these cases pin down:
the temporal index is ``trunc(arange(t) * tokens_per_second * second_per_grid)``, images
use interval 1, the text after a vision block resumes at the block's start +
max(h, w) / merge, padded slots hold 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omniret_jax.config import MediaPolicy, QwenVLConfig
from omniret_jax.data.batch import merge_indices
from omniret_jax.data.layout import Audio, Image, Text, Video, batch_media, expand_turn, pad_batch, rope_index
from omniret_jax.inputs import AUDIO, VIDEO
from tests.hf_tiny import IM_END, IMAGE_ID, VIDEO_ID, VISION_BOS, VISION_EOS, tiny_hf_vl

PAD_ID = 256


@pytest.fixture(scope="module", params=[2, 4], ids=lambda t: f"tps{t}")
def vl(request):
    """(transformers model, our config) at tokens_per_second 2 (released) and 4 (transformers' default)."""
    hf = tiny_hf_vl(tokens_per_second=request.param)
    cfg = QwenVLConfig.from_hf_dict(hf.config.to_dict())
    assert cfg.tokens_per_second == request.param
    return hf.model, cfg


def words(n: int, seed: int) -> Text:
    return Text(tuple(np.random.RandomState(seed).randint(0, 256, n).tolist()))


def assert_matches_hf(vl, rows, side, extra=0):
    hf, cfg = vl
    layouts = [expand_turn(items, [IM_END], cfg) for items in rows]
    batch = pad_batch([lay.input_ids for lay in layouts], max(len(lay.input_ids) for lay in layouts) + extra,
                      PAD_ID, side=side)
    meta = batch_media(layouts)
    pos, deltas = rope_index(batch.input_ids, batch.attention_mask, cfg, **meta)
    ids = batch.input_ids
    types = np.where(ids == IMAGE_ID, 1, np.where(ids == VIDEO_ID, 2, 0))
    g = lambda x, dtype: None if x is None else torch.tensor(x, dtype=dtype)  # noqa: E731
    with torch.no_grad():
        ref, ref_deltas = hf.get_rope_index(
            torch.tensor(ids, dtype=torch.long), torch.tensor(types), image_grid_thw=g(meta["image_grid_thw"], torch.long),
            video_grid_thw=g(meta["video_grid_thw"], torch.long),
            second_per_grid_ts=g(meta["second_per_grid"], torch.float32), attention_mask=torch.tensor(batch.attention_mask))
    np.testing.assert_array_equal(pos, ref.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy().reshape(-1))
    return pos, batch


ROWS = {
    "text_only": [[words(7, 0)], [words(3, 1)]],
    "image": [[Image((1, 4, 6)), words(4, 2)]],
    "images": [[Image((1, 8, 8)), words(2, 3), Image((1, 6, 10))], [Image((1, 4, 4))]],
    "video_sec0.5": [[Video((4, 4, 8), 0.5), words(3, 4)]],
    "video_sec1": [[Video((3, 8, 4), 1.0), words(3, 5)]],
    "video_sec2.5": [[words(2, 6), Video((4, 4, 4), 2.5), words(3, 7)]],
    # 1/12 s is the processor's fallback fps (24) at temporal patch 2; 0.83 truncates.
    "video_fractional": [[Video((5, 4, 4), 0.83)], [Video((6, 4, 4), 1 / 12)]],
    "video_and_image": [[Video((3, 4, 4), 1.0), Image((1, 4, 6)), words(2, 8)],
                        [Image((1, 6, 4)), Video((2, 8, 8), 2.5)]],
    "mixed": [[words(9, 9)], [Image((1, 8, 8))], [Video((2, 8, 12), 2.0), words(4, 10)],
              [Video((4, 4, 4), 0.5), Image((1, 4, 4))]],
}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", sorted(ROWS))
def test_rope_index_equals_get_rope_index(vl, case, side):
    assert_matches_hf(vl, ROWS[case], side, extra=3)


def test_the_5x_rule_by_hand(vl):
    """A word, a video (2, 4, 8) at 2.5 s per grid, a word, <|im_end|>: the block starts at 2 (after the
    word and <|vision_start|>), its t ids are trunc(k * tps * 2.5) + 2, and <|vision_end|> resumes at
    2 + max(4, 8) / 2 = 6, below the video's largest t."""
    hf, cfg = vl
    pos, batch = assert_matches_hf(vl, [[words(1, 0), Video((2, 4, 8), 2.5), words(1, 1)]], "right")
    row = pos[:, 0, batch.attention_mask[0] == 1]
    step = int(cfg.tokens_per_second * 2.5)
    video = batch.input_ids[0] == VIDEO_ID
    assert sorted(set(row[0, video].tolist())) == [2, 2 + step]
    real = batch.input_ids[0][batch.attention_mask[0] == 1]
    assert (real[-4], real[-3]) == (VIDEO_ID, VISION_EOS)
    assert row[:, -4].tolist() == [2 + step, 3, 5]        # last video token (t, h, w)
    assert row[:, -3].tolist() == [6, 6, 6]               # <|vision_end|> resumes at start + 4
    assert row[0, -1] == 8


def test_padding_gets_position_zero(vl):
    pos, batch = assert_matches_hf(vl, [[Image((1, 4, 4))], [words(1, 0)]], "left", extra=2)
    assert (pos[:, batch.attention_mask == 0] == 0).all()


# -- refused input, before jit ------------------------------------------------------------

CFG = QwenVLConfig.from_hf_dict(tiny_hf_vl().config.to_dict())
VIDEO_ONLY = MediaPolicy(kinds=("video",), max_frames=8)


def test_an_image_where_the_policy_expects_video_is_refused():
    with pytest.raises(ValueError, match=r"media item 1 is Image \(grid_thw \(1, 4, 4\)\) but this layout accepts "
                                         r"only video \(MediaPolicy.kinds=\('video',\)\)"):
        expand_turn([Video((2, 4, 4), 1.0), Image((1, 4, 4))], [IM_END], CFG, policy=VIDEO_ONLY)


def test_too_many_frames_are_refused():
    expand_turn([Video((4, 4, 4), 1.0)], [IM_END], CFG, policy=VIDEO_ONLY)  # 8 frames: accepted
    with pytest.raises(ValueError, match=r"media item 0: video grid_thw \(5, 4, 4\) holds 10 frames \(grid_t 5 x "
                                         r"temporal_patch_size 2\), above MediaPolicy.max_frames=8"):
        expand_turn([Video((5, 4, 4), 1.0)], [IM_END], CFG, policy=VIDEO_ONLY)


def test_audio_is_refused_by_the_vl_backbone():
    with pytest.raises(ValueError, match="carries audio, but the qwen2_5_vl backbone has no audio tower"):
        expand_turn([Audio(400)], [IM_END], CFG)
    with pytest.raises(ValueError, match="carries audio, but the qwen2_5_vl backbone has no audio tower"):
        expand_turn([Video((2, 4, 4), 1.0, audio_mel_len=400)], [IM_END], CFG)
    ids = np.asarray([[VISION_BOS, VIDEO_ID, VIDEO_ID, VIDEO_ID, VIDEO_ID, VISION_EOS]])
    with pytest.raises(ValueError, match="audio features given, but the qwen2_5_vl backbone has no audio"):
        merge_indices(ids, CFG, {VIDEO: [4], AUDIO: [3]}, {VIDEO: 4, AUDIO: 4})


def test_mismatched_grids_are_refused():
    lay = expand_turn([Video((2, 4, 4), 1.0)], [IM_END], CFG)
    ids, mask = lay.input_ids[None], np.ones((1, len(lay.input_ids)), np.int32)
    with pytest.raises(ValueError, match=r"video block at index 1 has 8 placeholders, video_grid_thw \(2, 4, 8\) gives 16"):
        rope_index(ids, mask, CFG, video_grid_thw=[[2, 4, 8]], second_per_grid=[1.0])
    with pytest.raises(ValueError, match="second_per_grid is required"):
        rope_index(ids, mask, CFG, video_grid_thw=[[2, 4, 4]])


def test_media_policy_validates_itself():
    with pytest.raises(ValueError, match="MediaPolicy.kinds='video'"):
        MediaPolicy(kinds="video")
    with pytest.raises(ValueError, match="max_frames must be a positive int"):
        MediaPolicy(max_frames=0)
