"""Host-side token layout vs the transformers references.

* ``rope_index`` is compared for exact equality (every slot, padding included,
  and the deltas) with ``Qwen2_5OmniThinkerModel.get_rope_index`` of the tiny
  thinker in tests/hf_tiny.py.
* Placeholder expansion is compared with the token ids ``Qwen2_5OmniProcessor``
  writes, run end to end on a tokenizer, WhisperFeatureExtractor and
  Qwen2VLImageProcessorPil built offline here. The real video processor needs
  torchvision, which cannot be installed next to torch 2.13 (architecture.md
  section 6), so the processor gets a stand-in video processor that only
  reports ``video_grid_thw`` from the frame array's shape (T/2, H/14, W/14);
  the video and audio-in-video token layouts compared are the processor's own
  code (``replace_video_token`` / ``replace_video_with_audio_token``, reached
  through ``__call__``). transformers does not export ``VideoProcessorMixin``
  without torchvision, so the processor's class check is pointed at it for the
  fixture's lifetime.
* WAVE-only behaviour (doubled audio placeholders, WAVE's chunk windows) has no
  runnable oracle here: it is checked on hand-derived layouts and positions,
  and, for doubled standalone audio, against transformers given an audio twice
  as long.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (BatchFeature, Qwen2_5OmniProcessor, Qwen2Tokenizer, Qwen2VLImageProcessorPil,
                          WhisperFeatureExtractor, processing_utils)
from transformers.video_processing_utils import VideoProcessorMixin

from omniret_jax.data.layout import (Audio, Image, Text, Video, audio_token_count, batch_media, expand_turn,
                                     pad_batch, rope_index)
from omniret_jax.config import ThinkerConfig
from tests.hf_tiny import (AUDIO_BOS, AUDIO_EOS, AUDIO_ID, IM_END, IMAGE_ID, VIDEO_ID, VISION_BOS, VISION_EOS,
                           tiny_hf_config, tiny_hf_thinker)

CFG = ThinkerConfig.from_hf_dict(tiny_hf_config().to_dict())
PAD_ID = 256
V, A = VIDEO_ID, AUDIO_ID


def words(n: int, seed: int) -> Text:
    """``n`` ordinary (non-special) token ids."""
    return Text(tuple(np.random.RandomState(seed).randint(0, 256, n).tolist()))


def mel_for(n_tokens: int) -> int:
    """Mel frames that give exactly ``n_tokens`` audio tokens."""
    return 4 * n_tokens


# -- rope_index vs transformers ------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_thinker().model


def hf_rope(model, ids, mask, image_grid_thw=None, video_grid_thw=None, second_per_grid=None,
            audio_feature_lens=None, use_audio_in_video=False, wave_doubled_audio=False):
    def t(x, dtype):
        return None if x is None else torch.as_tensor(np.asarray(x), dtype=dtype)

    assert not wave_doubled_audio, "transformers has no doubled-audio layout"
    with torch.no_grad():
        pos, delta = model.get_rope_index(
            input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
            image_grid_thw=t(image_grid_thw, torch.long), video_grid_thw=t(video_grid_thw, torch.long),
            second_per_grids=t(second_per_grid, torch.float32), audio_seqlens=t(audio_feature_lens, torch.long),
            use_audio_in_video=use_audio_in_video)
    return pos.numpy(), delta.numpy().reshape(-1)


def assert_matches_hf(model, rows, side, extra=0, **expand_kw):
    """Expand ``rows`` (lists of turn items), pad, and compare ``rope_index`` with transformers."""
    layouts = [expand_turn(items, [IM_END], CFG, **expand_kw) for items in rows]
    length = max(len(lay.input_ids) for lay in layouts) + extra
    batch = pad_batch([lay.input_ids for lay in layouts], length, PAD_ID, side=side)
    kw = batch_media(layouts)
    ours, our_delta = rope_index(batch.input_ids, batch.attention_mask, CFG, **kw)
    ref, ref_delta = hf_rope(model, batch.input_ids, batch.attention_mask, **kw)
    assert ours.dtype == np.int32 and ours.shape == (3,) + batch.input_ids.shape
    mismatches = int((ours != ref).sum())
    print(f"{side}: {mismatches} mismatching position ids of {ref.size}; deltas {our_delta} vs {ref_delta}")
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(our_delta, ref_delta)
    return batch, ours


ROPE_CASES = {
    "text": [[words(7, 0)], [words(2, 1)], [], [words(12, 3)]],
    "image": [[words(3, 0), Image((1, 4, 6)), words(5, 1)]],
    "multi_image": [[Image((1, 4, 6)), words(4, 0), Image((2, 4, 4)), Image((1, 2, 2)), words(2, 1)]],
    "video_spg1": [[words(2, 0), Video((3, 4, 6), 1.0)]],
    "video_spg2": [[Video((4, 4, 4), 2.0), words(3, 0)]],
    "video_spg0.5": [[Video((5, 2, 4), 0.5), words(3, 0)]],
    "video_spg1.5": [[Video((5, 4, 2), 1.5), words(3, 0)]],
    "video_spg0.3": [[Video((6, 2, 2), 0.3), words(3, 0)]],
    "audio": [[words(3, 0), Audio(300), words(2, 1), Audio(57)]],
    "audio_and_video": [[Video((3, 4, 4), 1.0), words(4, 0), Audio(250), Image((1, 2, 4))]],
}

AV_CASES = {
    # 4 temporal grids, 8 s of audio: V0 A0 V1 A1 A2 A3 (2 video, 4 audio chunks).
    "av_spg1_8s": [[words(3, 0), Video((4, 4, 4), 1.0, audio_mel_len=800), words(2, 1)]],
    # One grid per chunk: V A V A V A V A.
    "av_spg2_8s": [[Video((4, 4, 6), 2.0, audio_mel_len=800)]],
    "av_spg0.5_8s": [[Video((4, 2, 4), 0.5, audio_mel_len=800), words(2, 0)]],
    # Grids 75 ids apart with 50-id windows: the lagging chunk counter splits frames.
    "av_spg3_8s": [[Video((4, 4, 4), 3.0, audio_mel_len=800)]],
    # Video outlasts the audio (last run is video).
    "av_short_audio": [[Video((8, 2, 4), 1.0, audio_mel_len=200)]],
    # Last run is audio whose positions stay below the video's maximum.
    "av_audio_ends_low": [[Video((4, 4, 4), 1.0, audio_mel_len=mel_for(60)), words(2, 0)]],
    "av_with_audio_and_image": [[Audio(300), words(2, 0), Video((4, 2, 2), 1.0, audio_mel_len=420),
                                 Image((1, 4, 4))]],
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", list(ROPE_CASES) + list(AV_CASES))
def test_rope_index_matches_transformers(hf_model, case, side):
    rows = ROPE_CASES.get(case) or AV_CASES[case]
    assert_matches_hf(hf_model, rows, side, extra=3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_index_mixed_batch(hf_model, side):
    rows = [rows[0] for rows in ROPE_CASES.values() if rows[0]]
    batch, _ = assert_matches_hf(hf_model, rows, side, extra=2)
    assert batch.input_ids.shape[0] == len(rows)


@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_index_mixed_batch_audio_in_video(hf_model, side):
    rows = [[words(5, 0)], ROPE_CASES["image"][0], ROPE_CASES["audio"][0]] + [r[0] for r in AV_CASES.values()]
    assert_matches_hf(hf_model, rows, side, extra=2)


def test_text_only_single_token_delta(hf_model):
    """transformers' text-only branch counts padded slots (position 1) in the delta's maximum."""
    ids = np.array([[5, PAD_ID, PAD_ID], [5, 6, 7]])
    mask = np.array([[1, 0, 0], [1, 1, 1]])
    _, delta = rope_index(ids, mask, CFG)
    np.testing.assert_array_equal(delta, hf_rope(hf_model, ids, mask)[1])
    assert delta.tolist() == [1, 0]


def test_doubled_standalone_audio_matches_audio_twice_as_long(hf_model):
    """A WAVE-doubled audio run of 2*N_w positions equals transformers' run for an audio with 2*N_w tokens."""
    layouts = [expand_turn([Image((1, 2, 2)), Audio(300), words(3, 0)], [IM_END], CFG, wave_doubled_audio=True)]
    assert (layouts[0].input_ids == AUDIO_ID).sum() == 2 * audio_token_count(300)
    batch = pad_batch([layouts[0].input_ids], len(layouts[0].input_ids) + 2, PAD_ID, side="left")
    kw = batch_media(layouts)
    ours, our_delta = rope_index(batch.input_ids, batch.attention_mask, CFG, **kw)
    ref, ref_delta = hf_rope(hf_model, batch.input_ids, batch.attention_mask, **{
        **kw, "audio_feature_lens": [mel_for(2 * audio_token_count(300))], "wave_doubled_audio": False})
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(our_delta, ref_delta)


def test_doubled_audio_in_video_hand_derived():
    """WAVE layout: chunks cut on N_w audio tokens, each audio token doubled; positions read from the tokens."""
    cfg = CFG.replace(position_id_per_seconds=2)  # 4-id windows keep the example small
    # 3 one-token grids at t = 0, 2, 4 -> video chunks [2, 1]; N_w = 5 -> audio chunks [4, 1], doubled [8, 2].
    lay = expand_turn([Text((10, 11)), Video((3, 2, 2), 1.0, audio_mel_len=mel_for(5))], [12, 13], cfg,
                      wave_doubled_audio=True)
    want_ids = [10, 11, VISION_BOS, AUDIO_BOS, V, V] + [A] * 8 + [V, A, A, AUDIO_EOS, VISION_EOS, 12, 13]
    assert lay.input_ids.tolist() == want_ids
    kw = batch_media([lay])
    pos, delta = rope_index(lay.input_ids[None], np.ones((1, len(want_ids))), cfg, **kw)
    t = [0, 1, 2, 2, 3, 5, *range(3, 11), 7, 11, 12, 13, 13, 14, 15]
    hw = [0, 1, 2, 2, 3, 3, *range(3, 11), 3, 11, 12, 13, 13, 14, 15]
    np.testing.assert_array_equal(pos[:, 0], np.array([t, hw, hw]))
    assert delta.tolist() == [16 - len(want_ids)]
    # Without the flag the doubled run does not match audio_feature_lens.
    with pytest.raises(ValueError, match="audio placeholders"):
        rope_index(lay.input_ids[None], np.ones((1, len(want_ids))), cfg, **{**kw, "wave_doubled_audio": False})


def test_wave_chunking_edge_tolerance():
    """WAVE's windows are 2*second_per_grid s wide and a time within 1e-5 (relative) of an edge crosses it.

    spg = 0.104: one-token grids at 2.6 t ids, 5.2-id windows; grid 6 sits at 15.6, a hair under the
    float64 edge 3 * 5.2 = 15.600000000000001, so a strict test would keep it in the third window.
    """
    video = Video((8, 2, 2), 0.104, audio_mel_len=mel_for(20))  # audio windows at 6, 11, 16 -> 6, 5, 5, 4
    wave = expand_turn([video], [], CFG, wave_chunking=True).input_ids.tolist()
    assert wave == [VISION_BOS, AUDIO_BOS] + [V] * 2 + [A] * 6 + [V] * 2 + [A] * 5 + [V] * 2 + [A] * 5 \
        + [V] * 2 + [A] * 4 + [AUDIO_EOS, VISION_EOS]


# -- errors ------------------------------------------------------------------------------

def test_rope_index_errors():
    lay = expand_turn([Image((1, 4, 4)), words(2, 0)], [IM_END], CFG)
    ids, mask = lay.input_ids[None], np.ones((1, len(lay.input_ids)))
    with pytest.raises(ValueError, match="image_grid_thw has 0 entries"):
        rope_index(ids, mask, CFG)
    with pytest.raises(ValueError, match="gives 1"):
        rope_index(ids, mask, CFG, image_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="2 entries but the batch holds 1"):
        rope_index(ids, mask, CFG, image_grid_thw=[[1, 4, 4], [1, 2, 2]])
    no_bos = ids[:, 1:]
    with pytest.raises(ValueError, match="vision_bos"):
        rope_index(no_bos, mask[:, 1:], CFG, image_grid_thw=[[1, 4, 4]])
    av = expand_turn([Video((2, 2, 2), 1.0, audio_mel_len=200)], [], CFG)
    kw = {**batch_media([av]), "use_audio_in_video": False}
    with pytest.raises(ValueError, match="use_audio_in_video=False"):
        rope_index(av.input_ids[None], np.ones((1, len(av.input_ids))), CFG, **kw)
    with pytest.raises(ValueError, match="second_per_grid is required"):
        rope_index(av.input_ids[None], np.ones((1, len(av.input_ids))), CFG, video_grid_thw=[[2, 2, 2]],
                   use_audio_in_video=True)
    with pytest.raises(ValueError, match="no real token"):
        rope_index(np.zeros((1, 4), int), np.zeros((1, 4)), CFG, image_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        expand_turn([Image((1, 3, 4))], [], CFG)
    with pytest.raises(ValueError, match="no audio token"):
        expand_turn([Audio(2)], [], CFG)


def test_pad_batch():
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8]]
    right = pad_batch(seqs, 5, 0)
    np.testing.assert_array_equal(right.input_ids, [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [5, 6, 7, 8, 0]])
    np.testing.assert_array_equal(right.attention_mask, [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(right.last_index, [2, 0, 3])
    left = pad_batch(seqs, 5, 0, side="left")
    np.testing.assert_array_equal(left.input_ids, [[0, 0, 1, 2, 3], [0, 0, 0, 0, 4], [0, 5, 6, 7, 8]])
    np.testing.assert_array_equal(left.last_index, [4, 4, 4])
    # The gathered last token is the same real token either way.
    rows = np.arange(3)
    np.testing.assert_array_equal(right.input_ids[rows, right.last_index], left.input_ids[rows, left.last_index])
    with pytest.raises(ValueError, match=r"sample 2 \('clip-9'\) has 4 tokens, longer than the padded length 3"):
        pad_batch(seqs, 3, 0, names=["a", "b", "clip-9"])
    with pytest.raises(ValueError, match="sample 1 is empty"):
        pad_batch([[1], []], 3, 0)


# -- expansion vs Qwen2_5OmniProcessor ---------------------------------------------------

SPECIAL = {"<|endoftext|>": PAD_ID, "<|AUDIO|>": AUDIO_ID, "<|IMAGE|>": IMAGE_ID, "<|VIDEO|>": VIDEO_ID,
           "<|audio_bos|>": AUDIO_BOS, "<|audio_eos|>": AUDIO_EOS, "<|vision_bos|>": VISION_BOS,
           "<|vision_eos|>": VISION_EOS, "<|im_end|>": IM_END, "<|im_start|>": 298}


class GridOnlyVideoProcessor(VideoProcessorMixin):
    """Stand-in for Qwen2VLVideoProcessor (needs torchvision): reports the grid of already-sized frames."""
    merge_size, temporal_patch_size, patch_size = 2, 2, 14

    def __call__(self, videos, **kwargs):
        grids = [[len(v) // self.temporal_patch_size, v.shape[1] // self.patch_size, v.shape[2] // self.patch_size]
                 for v in videos]
        return BatchFeature({"video_grid_thw": np.asarray(grids)})


@pytest.fixture(scope="module")
def processor():
    # Byte-level alphabet as the base vocabulary (no merges), specials at the tiny thinker's ids.
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update(SPECIAL)
    names = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
             "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
             "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=names)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(processing_utils.transformers_module, "VideoProcessorMixin", VideoProcessorMixin, raising=False)
        proc = Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessorPil(),
                                    video_processor=GridOnlyVideoProcessor(),
                                    feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok)
        yield proc


IMG = "<|vision_bos|><|IMAGE|><|vision_eos|>"
AUD = "<|audio_bos|><|AUDIO|><|audio_eos|>"
VID = "<|vision_bos|><|VIDEO|><|vision_eos|>"
PROMPT = "Describe the clip.<|im_end|>"


def image(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)


def wave(seconds, seed=0):
    return np.random.RandomState(seed).randn(int(16000 * seconds)).astype(np.float32)


def frames(n, h=56, w=56):
    return np.zeros((n, h, w, 3), np.uint8)


def run_processor(proc, text, **kw):
    out = proc(text=[text], **kw)
    mel = np.asarray(out["feature_attention_mask"]).sum(-1).tolist() if "feature_attention_mask" in out else []
    return out, list(out["input_ids"][0]), mel


def test_expansion_image_audio(processor):
    out, ids, mel = run_processor(processor, IMG + AUD + PROMPT, images=[image(56, 84)], audio=[wave(3)])
    grid = tuple(np.asarray(out["image_grid_thw"])[0])
    ours = expand_turn([Image(grid), Audio(mel[0])], processor.tokenizer(PROMPT)["input_ids"], CFG)
    assert ours.input_ids.tolist() == ids, (ours.input_ids.tolist(), ids)
    assert mel[0] == 300 and (ours.input_ids == AUDIO_ID).sum() == 75


def test_expansion_multiple_images_with_text(processor):
    text = IMG + "then" + IMG + IMG + AUD + PROMPT
    out, ids, mel = run_processor(processor, text, images=[image(56, 84), image(112, 56, 1), image(28, 28, 2)],
                                  audio=[wave(1.37)])
    g = [tuple(x) for x in np.asarray(out["image_grid_thw"])]
    tk = processor.tokenizer
    ours = expand_turn([Image(g[0]), Text(tuple(tk("then")["input_ids"])), Image(g[1]), Image(g[2]), Audio(mel[0])],
                       tk(PROMPT)["input_ids"], CFG)
    assert ours.input_ids.tolist() == ids
    np.testing.assert_array_equal(ours.image_grid_thw, np.asarray(out["image_grid_thw"]))


@pytest.mark.parametrize("fps", [2.0, 1.0, 4.0, 4.0 / 3.0])
def test_expansion_video(processor, fps):
    out, ids, _ = run_processor(processor, VID + PROMPT, videos=[frames(6, 56, 84)], fps=fps)
    spg = out["video_second_per_grid"][0]
    ours = expand_turn([Video(tuple(np.asarray(out["video_grid_thw"])[0]), spg)],
                       processor.tokenizer(PROMPT)["input_ids"], CFG)
    assert ours.input_ids.tolist() == ids


@pytest.mark.parametrize("fps,n_frames,seconds", [(2.0, 8, 8.0), (1.0, 8, 8.0), (4.0, 8, 8.0), (2.0, 16, 3.3),
                                                  (2.0 / 3.0, 8, 8.0)])
def test_expansion_audio_in_video(processor, fps, n_frames, seconds):
    out, ids, mel = run_processor(processor, VID + PROMPT, videos=[frames(n_frames)], audio=[wave(seconds)],
                                  audio_from_video_indices=[0], load_audio_from_video=True, fps=fps)
    grid = tuple(np.asarray(out["video_grid_thw"])[0])
    video = Video(grid, out["video_second_per_grid"][0], audio_mel_len=mel[0])
    ours = expand_turn([video], processor.tokenizer(PROMPT)["input_ids"], CFG)
    assert ours.input_ids.tolist() == ids
    body = ours.input_ids[2:ids.index(AUDIO_EOS)]
    runs = np.flatnonzero(np.diff(body) != 0).size + 1
    print(f"fps={fps}: grid {grid}, {mel[0]} mel frames, {runs} interleaved runs")
    if seconds == 8.0 and fps == 2.0:
        assert runs == 4  # V0 A0 V1 A1..A3: more than one chunk


def test_expansion_audio_and_audio_in_video_batch(processor):
    """A standalone audio plus a video carrying its own audio, next to a second, shorter sample (left-padded)."""
    texts = [AUD + "and" + VID + PROMPT, IMG + PROMPT]
    out = processor(text=texts, videos=[frames(8)], audio=[wave(2.5, 1), wave(8.0)], images=[image(56, 56)],
                    audio_from_video_indices=[None, 0], load_audio_from_video=True, fps=2.0, padding=True)
    mel = np.asarray(out["feature_attention_mask"]).sum(-1).tolist()
    tk = processor.tokenizer
    prompt = tk(PROMPT)["input_ids"]
    lays = [
        expand_turn([Audio(mel[0]), Text(tuple(tk("and")["input_ids"])),
                     Video(tuple(np.asarray(out["video_grid_thw"])[0]), out["video_second_per_grid"][0],
                           audio_mel_len=mel[1])], prompt, CFG),
        expand_turn([Image(tuple(np.asarray(out["image_grid_thw"])[0]))], prompt, CFG),
    ]
    ids = np.asarray(out["input_ids"])
    batch = pad_batch([lay.input_ids for lay in lays], ids.shape[1], tk.pad_token_id, side="left")
    np.testing.assert_array_equal(batch.input_ids, ids)
    np.testing.assert_array_equal(batch.attention_mask, np.asarray(out["attention_mask"]))


@pytest.mark.parametrize("spg_fps", [4.0, 1.0])
def test_wave_chunking_matches_processor_with_two_grid_windows(processor, spg_fps):
    """Away from float edges WAVE's windows equal the processor's with seconds_per_chunk = 2 * second_per_grid."""
    out, ids, mel = run_processor(processor, VID + PROMPT, videos=[frames(8)], audio=[wave(8.0)],
                                  audio_from_video_indices=[0], load_audio_from_video=True, fps=spg_fps,
                                  seconds_per_chunk=2 * 2.0 / spg_fps)
    video = Video(tuple(np.asarray(out["video_grid_thw"])[0]), out["video_second_per_grid"][0], audio_mel_len=mel[0])
    ours = expand_turn([video], processor.tokenizer(PROMPT)["input_ids"], CFG, wave_chunking=True)
    assert ours.input_ids.tolist() == ids
