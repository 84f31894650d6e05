"""Token layout of a Qwen2.5-Omni thinker or Qwen2.5-VL turn, decided on the host with NumPy.

Everything here depends on the data (how many placeholders a clip needs, how a
video's audio interleaves with its frames, where each token sits in M-RoPE
space), so it runs before jit and hands fixed-shape arrays to the model:

* placeholder expansion: a turn described without a tokenizer (media items in
  order, then prompt token ids) becomes token ids with the start/end tokens and
  the exact placeholder counts the Hugging Face processor writes;
* ``rope_index``: the (3, B, S) M-RoPE position ids and per-row deltas, equal to
  transformers' ``Qwen2_5Omni*.get_rope_index`` or, for a ``qwen2_5_vl`` config,
  ``Qwen2_5_VLModel.get_rope_index`` (the rules differ in the temporal index, where text
  resumes after a vision block, and the value of padded slots; see ``rope_index``);
* padding to a fixed length with the index of each row's last real token.

WAVE (architecture.md section 2) reserves two audio placeholders per Whisper
token (Whisper and BEATs features interleaved): ``wave_doubled_audio`` doubles
the counts. Position ids need no separate path for it, because ``rope_index``
gives each ``<|AUDIO|>`` token the next audio position and reads the
video/audio chunk order of an audio-in-video block from the tokens themselves
(as WAVE's own ``get_rope_index`` does), so a doubled run simply gets
``arange(2 * N_w)``; the flag there only checks the run lengths.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from omniret_jax.config import BackboneConfig, MediaPolicy, ThinkerConfig

# WAVE/OmniRetriever's processor lets a video time within this relative
# distance of a chunk edge count as past it (guards float round-off).
_WAVE_EDGE_RTOL = 1e-5


# -- token counts ---------------------------------------------------------------

def audio_output_lengths(feature_lens) -> np.ndarray:
    """Tokens the Whisper tower emits per audio of ``feature_lens`` mel frames (conv stride 2, then pool 2)."""
    lens = np.asarray(feature_lens, dtype=np.int64)
    after_conv = (lens - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def audio_token_count(mel_len: int) -> int:
    """``audio_output_lengths`` of one audio, which must yield at least one token."""
    count = int(audio_output_lengths(int(mel_len)))
    if count < 1:
        raise ValueError(f"audio of {mel_len} mel frames yields no audio token (need >= 3 frames)")
    return count


def vision_token_count(grid_thw: Sequence[int], merge: int) -> int:
    """Placeholders of one image/video: patches in the (t, h, w) grid over ``merge**2``."""
    t, h, w = _grid(grid_thw)
    if h % merge or w % merge:
        raise ValueError(f"grid_thw {tuple(grid_thw)}: height and width must be multiples of "
                         f"spatial_merge_size={merge}")
    return t * (h // merge) * (w // merge)


def _grid(grid_thw) -> tuple[int, int, int]:
    g = tuple(int(x) for x in np.asarray(grid_thw).reshape(-1))
    if len(g) != 3 or min(g) < 1:
        raise ValueError(f"grid_thw must be three positive ints (t, h, w), got {grid_thw!r}")
    return g


def _chunk_lengths(times: np.ndarray, window: float, rtol: float = 0.0) -> list[int]:
    """Split a non-decreasing time list into consecutive chunks, as the reference does.

    A new chunk opens at the first element reaching the next window edge
    (``k * window``, k = 1, 2, ...); each opening advances k by one only, so a time
    that jumps over several windows opens one chunk per element until k catches up
    (the reference's behaviour, kept for exact layouts).
    """
    if not window > 0:
        raise ValueError(f"chunk window must be positive, got {window}")
    lengths, start, k = [], 0, 1
    for i, v in enumerate(times.tolist()):
        edge = k * window
        if v >= edge or (rtol > 0 and math.isclose(v, edge, rel_tol=rtol)):
            lengths.append(i - start)
            start, k = i, k + 1
    lengths.append(len(times) - start)
    return lengths


# -- placeholder expansion --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Text:
    ids: tuple[int, ...]  # already-tokenised text between media items


@dataclasses.dataclass(frozen=True)
class Image:
    grid_thw: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Audio:
    mel_len: int  # valid mel frames (feature_attention_mask.sum())


@dataclasses.dataclass(frozen=True)
class Video:
    grid_thw: tuple[int, int, int]
    second_per_grid: float  # temporal_patch_size / fps
    # Mel frames of the clip's own audio track; set, the audio is interleaved
    # with the frames (the processor's load_audio_from_video / use_audio_in_video).
    audio_mel_len: int | None = None


@dataclasses.dataclass(frozen=True)
class TurnLayout:
    """Token ids of one turn plus its media metadata in the order ``rope_index`` consumes it."""
    input_ids: np.ndarray            # [L] int32
    image_grid_thw: np.ndarray       # [n_images, 3] int64
    video_grid_thw: np.ndarray       # [n_videos, 3] int64
    second_per_grid: np.ndarray      # [n_videos] float64
    audio_mel_lens: np.ndarray       # [n_audios] int64; an audio-in-video track at its video's place
    use_audio_in_video: bool
    wave_doubled_audio: bool


def _video_times(grid_thw, second_per_grid: float, merge: int, pps) -> np.ndarray:
    """Processor-side (float64) time of every video placeholder, in position-id units."""
    t, h, w = _grid(grid_thw)
    per_frame = (h // merge) * (w // merge)
    return np.repeat(np.arange(t), per_frame) * float(second_per_grid) * pps


def interleaved_video_audio_ids(video: Video, cfg: ThinkerConfig, *, wave_doubled_audio: bool = False,
                                wave_chunking: bool = False) -> list[int]:
    """``<|vision_bos|><|audio_bos|> V.. A.. V.. A.. <|audio_eos|><|vision_eos|>`` of a video with audio.

    Video and audio placeholders are cut into windows of ``seconds_per_chunk``
    (times in position-id units: ``position_id_per_seconds`` per second; a video
    token's time is its frame index * second_per_grid, an audio token's its index)
    and written window by window, video first. Windows follow the processor:
    ``int(position_id_per_seconds * cfg.seconds_per_chunk)`` wide with a strict
    edge test. ``wave_chunking`` follows WAVE/OmniRetriever's data code instead:
    ``2 * second_per_grid`` seconds (two temporal grids), a float width, and a
    1e-5 relative tolerance at the edge. ``wave_doubled_audio`` doubles each
    window's audio run after chunking, as WAVE does.
    """
    if video.audio_mel_len is None:
        raise ValueError("interleaved_video_audio_ids needs Video.audio_mel_len")
    merge, pps = cfg.vision.spatial_merge_size, cfg.position_id_per_seconds
    vision_token_count(video.grid_thw, merge)  # validates the grid
    v_times = _video_times(video.grid_thw, video.second_per_grid, merge, pps)
    a_times = np.arange(audio_token_count(video.audio_mel_len))
    if wave_chunking:
        window, rtol = pps * (2.0 * float(video.second_per_grid)), _WAVE_EDGE_RTOL
    else:
        window, rtol = int(pps * cfg.seconds_per_chunk), 0.0
    v_chunks = _chunk_lengths(v_times, window, rtol)
    a_chunks = _chunk_lengths(a_times, window, rtol)
    per_audio = 2 if wave_doubled_audio else 1
    ids = [cfg.vision_start_token_id, cfg.audio_start_token_id]
    for j in range(max(len(v_chunks), len(a_chunks))):
        if j < len(v_chunks):
            ids += [cfg.video_token_id] * v_chunks[j]
        if j < len(a_chunks):
            ids += [cfg.audio_token_id] * (a_chunks[j] * per_audio)
    ids += [cfg.audio_end_token_id, cfg.vision_end_token_id]
    return ids


def media_ids(item: Text | Image | Video | Audio, cfg: BackboneConfig, *, wave_doubled_audio: bool = False,
              wave_chunking: bool = False) -> list[int]:
    """Token ids of one item: text as given, media with its start/end tokens and placeholders."""
    merge = cfg.vision.spatial_merge_size
    if isinstance(item, Text):
        return [int(t) for t in item.ids]
    if isinstance(item, Image):
        n = vision_token_count(item.grid_thw, merge)
        return [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    if cfg.audio is None and (isinstance(item, Audio) or getattr(item, "audio_mel_len", None) is not None):
        raise ValueError(f"{item!r} carries audio, but the {cfg.family} backbone has no audio tower")
    if isinstance(item, Video):
        if item.audio_mel_len is not None:
            return interleaved_video_audio_ids(item, cfg, wave_doubled_audio=wave_doubled_audio,
                                               wave_chunking=wave_chunking)
        n = vision_token_count(item.grid_thw, merge)
        return [cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id]
    if isinstance(item, Audio):
        n = audio_token_count(item.mel_len) * (2 if wave_doubled_audio else 1)
        return [cfg.audio_start_token_id] + [cfg.audio_token_id] * n + [cfg.audio_end_token_id]
    raise ValueError(f"unknown turn item {item!r}; expected Text, Image, Video or Audio")


def check_media(media: Sequence[Text | Image | Video | Audio], cfg: BackboneConfig, policy: MediaPolicy) -> None:
    """Refuse, naming the item and the value, media the policy does not accept."""
    for i, item in enumerate(media):
        kinds = {Image: ("image",), Audio: ("audio",), Text: ()}.get(type(item))
        if isinstance(item, Video):
            kinds = ("video",) if item.audio_mel_len is None else ("video", "audio")
        refused = [k for k in kinds or () if k not in policy.kinds]
        if refused:
            raise ValueError(f"media item {i} is {type(item).__name__}{_grid_note(item)} but this layout accepts "
                             f"only {', '.join(policy.kinds) or 'text'} (MediaPolicy.kinds={policy.kinds!r})")
        if isinstance(item, Video) and policy.max_frames is not None:
            t = _grid(item.grid_thw)[0]
            frames = t * cfg.vision.temporal_patch_size
            if frames > policy.max_frames:
                raise ValueError(f"media item {i}: video grid_thw {tuple(item.grid_thw)} holds {frames} frames "
                                 f"(grid_t {t} x temporal_patch_size {cfg.vision.temporal_patch_size}), above "
                                 f"MediaPolicy.max_frames={policy.max_frames}")


def _grid_note(item) -> str:
    return f" (grid_thw {tuple(item.grid_thw)})" if hasattr(item, "grid_thw") else ""


def expand_turn(media: Sequence[Text | Image | Video | Audio], prompt_ids: Sequence[int], cfg: BackboneConfig, *,
                wave_doubled_audio: bool = False, wave_chunking: bool = False,
                policy: MediaPolicy | None = None) -> TurnLayout:
    """``[media blocks in order][prompt_ids]`` with the metadata ``rope_index`` needs.

    ``prompt_ids`` is whatever follows the media (e.g. the tokenised prompt and
    ``<|im_end|>``); nothing is added or dropped around it. ``Text`` items put
    text between media blocks. ``policy`` (checked first) limits the media kinds
    and a video's frame count.
    """
    if policy is not None:
        check_media(media, cfg, policy)
    ids: list[int] = []
    images, videos, spg, audios = [], [], [], []
    for item in media:
        ids += media_ids(item, cfg, wave_doubled_audio=wave_doubled_audio, wave_chunking=wave_chunking)
        if isinstance(item, Image):
            images.append(_grid(item.grid_thw))
        elif isinstance(item, Video):
            videos.append(_grid(item.grid_thw))
            spg.append(float(item.second_per_grid))
            if item.audio_mel_len is not None:
                audios.append(int(item.audio_mel_len))
        elif isinstance(item, Audio):
            audios.append(int(item.mel_len))
    ids += [int(t) for t in prompt_ids]
    return TurnLayout(
        input_ids=np.asarray(ids, np.int32),
        image_grid_thw=np.asarray(images, np.int64).reshape(-1, 3),
        video_grid_thw=np.asarray(videos, np.int64).reshape(-1, 3),
        second_per_grid=np.asarray(spg, np.float64),
        audio_mel_lens=np.asarray(audios, np.int64),
        use_audio_in_video=any(isinstance(m, Video) and m.audio_mel_len is not None for m in media),
        wave_doubled_audio=wave_doubled_audio,
    )


def batch_media(layouts: Sequence[TurnLayout]) -> dict:
    """``rope_index`` keyword arguments for a batch whose rows are ``layouts`` in order.

    Absent modalities become None, as the model's inputs would be (it matters:
    with neither image nor video grids transformers takes its text-only branch).
    """
    if not layouts:
        raise ValueError("batch_media needs at least one TurnLayout")
    doubled = {lay.wave_doubled_audio for lay in layouts}
    if len(doubled) > 1:
        raise ValueError("layouts mix wave_doubled_audio=True and False in one batch")

    def cat(name):
        arr = np.concatenate([getattr(lay, name) for lay in layouts])
        return arr if len(arr) else None

    return dict(
        image_grid_thw=cat("image_grid_thw"), video_grid_thw=cat("video_grid_thw"),
        second_per_grid=cat("second_per_grid"), audio_feature_lens=cat("audio_mel_lens"),
        use_audio_in_video=any(lay.use_audio_in_video for lay in layouts),
        wave_doubled_audio=doubled.pop(),
    )


# -- M-RoPE position ids ------------------------------------------------------------

class _Queue:
    """Per-batch metadata consumed in order of appearance across rows (as transformers indexes it)."""

    def __init__(self, name: str, values, width: int | None):
        self.name = name
        self.values = None if values is None else np.asarray(values)
        if self.values is not None:
            shape = self.values.shape
            if len(shape) != (2 if width else 1) or (width and shape[1] != width):
                raise ValueError(f"{name} must have shape {f'(n, {width})' if width else '(n,)'}, got {shape}")
        self.used = 0

    def next(self, row: int, what: str):
        if self.values is None or self.used >= len(self.values):
            have = 0 if self.values is None else len(self.values)
            raise ValueError(f"row {row} has {what} number {self.used + 1} of the batch but {self.name} "
                             f"has {have} entries")
        self.used += 1
        return self.values[self.used - 1]

    def check_done(self):
        if self.values is not None and self.used != len(self.values):
            raise ValueError(f"{self.name} has {len(self.values)} entries but the batch holds {self.used} "
                             "matching placeholder blocks")


def _vision_positions(grid_thw, merge: int, t_values: np.ndarray) -> np.ndarray:
    """(3, n) relative (t, h, w) positions of a vision block, row-major over (t, h, w)."""
    t, h, w = _grid(grid_thw)
    gh, gw = h // merge, w // merge
    return np.stack([
        np.repeat(t_values.astype(np.int64), gh * gw),
        np.tile(np.repeat(np.arange(gh), gw), t),
        np.tile(np.arange(gw), t * gh),
    ])


def _video_t_values(grid_t: int, second_per_grid, pps) -> np.ndarray:
    """Model-side temporal index per grid: float32 product truncated, as transformers computes it."""
    prod = np.arange(grid_t, dtype=np.float32) * np.float32(second_per_grid) * np.float32(pps)
    return prod.astype(np.int64)


def _vl_video_t_values(grid_t: int, second_per_grid, tokens_per_second) -> np.ndarray:
    """Qwen2.5-VL's temporal index: ``trunc(arange(t) * (tokens_per_second * second_per_grid))``.

    In float32, the dtype of the processor's ``second_per_grid_ts`` tensor, and in
    transformers 5's order (the interval first). 4.52-4.57 cast ``second_per_grid`` to an
    integer first; 5.x and 4.49 do not.
    """
    interval = np.float32(tokens_per_second) * np.float32(second_per_grid)
    return (np.arange(grid_t, dtype=np.float32) * interval).astype(np.int64)


def _run_end(toks: np.ndarray, start: int) -> int:
    """End (exclusive) of the run of equal tokens starting at ``start``."""
    diff = np.flatnonzero(toks[start:] != toks[start])
    return start + int(diff[0]) if len(diff) else len(toks)


class _RowWalker:
    """Walks one row's real tokens segment by segment, filling (3, n) positions.

    Text gets consecutive positions and each media block starts at the next one.
    Qwen2.5-Omni: the token after a block continues from that block's largest
    position + 1 (the block's last run for audio-in-video, where both start tokens
    share a position and so do both end tokens). Qwen2.5-VL (transformers 5): it
    continues from the block's start + max(grid_h, grid_w) / merge, whatever the
    temporal extent (4.x continued from the largest position + 1, as Omni does).
    All as transformers does.
    """

    def __init__(self, cfg: BackboneConfig, queues: dict, use_audio_in_video: bool, wave_doubled_audio: bool):
        self.cfg, self.q = cfg, queues
        self.vl = cfg.family == "qwen2_5_vl"
        self.use_audio_in_video = use_audio_in_video
        self.audio_mult = 2 if wave_doubled_audio else 1
        self.merge = cfg.vision.spatial_merge_size
        self.placeholder_ids = [cfg.image_token_id, cfg.video_token_id] + (
            [] if cfg.audio_token_id is None else [cfg.audio_token_id])

    def positions(self, toks: np.ndarray, row: int) -> np.ndarray:
        c = self.cfg
        n = len(toks)
        out = np.empty((3, n), np.int64)
        placeholders = np.isin(toks, self.placeholder_ids)
        av_start = np.zeros(n, bool)
        if c.audio is not None:
            av_start[:-1] = (toks[:-1] == c.vision_start_token_id) & (toks[1:] == c.audio_start_token_id)
        events = np.flatnonzero(placeholders | av_start)
        nxt, i = 0, 0
        while i < n:
            k = np.searchsorted(events, i)
            j = int(events[k]) if k < len(events) else n
            out[:, i:j] = nxt + np.arange(j - i)  # text up to the next media block
            nxt += j - i
            i = j
            if i == n:
                break
            if av_start[i]:
                i, nxt = self._audio_in_video(toks, i, nxt, out, row)
            else:
                i, nxt = self._plain_block(toks, i, nxt, out, row)
        return out

    def _expect(self, toks, idx, token_id, row, what):
        if not (0 <= idx < len(toks)) or toks[idx] != token_id:
            got = "nothing" if not (0 <= idx < len(toks)) else f"token {int(toks[idx])}"
            raise ValueError(f"row {row}: expected {what} (id {token_id}) at real-token index {idx}, got {got}")

    def _plain_block(self, toks, i, nxt, out, row):
        c, tok = self.cfg, int(toks[i])
        end = _run_end(toks, i)
        length = end - i
        if tok == c.audio_token_id:
            self._expect(toks, i - 1, c.audio_start_token_id, row, "<|audio_bos|> before audio placeholders")
            self._expect(toks, end, c.audio_end_token_id, row, "<|audio_eos|> after audio placeholders")
            lens = self.q["audio"]
            if lens.values is not None:
                want = audio_token_count(lens.next(row, "audio")) * self.audio_mult
                if want != length:
                    raise ValueError(f"row {row}: audio block at index {i} has {length} placeholders, "
                                     f"audio_feature_lens gives {want}")
            block = np.broadcast_to(np.arange(length), (3, length))
        else:
            is_image = tok == c.image_token_id
            kind = "image" if is_image else "video"
            self._expect(toks, i - 1, c.vision_start_token_id, row, f"<|vision_bos|> before {kind} placeholders")
            self._expect(toks, end, c.vision_end_token_id, row, f"<|vision_eos|> after {kind} placeholders")
            grid = _grid(self.q[kind].next(row, kind))
            want = vision_token_count(grid, self.merge)
            if want != length:
                raise ValueError(f"row {row}: {kind} block at index {i} has {length} placeholders, "
                                 f"{kind}_grid_thw {grid} gives {want}")
            if is_image:
                t_values = np.arange(grid[0]) * (1 if self.vl else c.position_id_per_seconds)
            elif self.vl:
                t_values = _vl_video_t_values(grid[0], self.q["spg"].next(row, "video"), c.tokens_per_second)
            else:
                t_values = _video_t_values(grid[0], self.q["spg"].next(row, "video"), c.position_id_per_seconds)
            block = _vision_positions(grid, self.merge, t_values)
        out[:, i:end] = block + nxt
        if self.vl:  # (no audio blocks in a VL row)
            return end, nxt + max(grid[1], grid[2]) // self.merge
        return end, int(out[:, i:end].max()) + 1

    def _audio_in_video(self, toks, i, nxt, out, row):
        c = self.cfg
        if not self.use_audio_in_video:
            raise ValueError(f"row {row}: audio-in-video block (<|vision_bos|><|audio_bos|>) at index {i} "
                             "but use_audio_in_video=False")
        body = i + 2
        end = body
        while end < len(toks) and toks[end] in (c.video_token_id, c.audio_token_id):
            end += 1
        self._expect(toks, end, c.audio_end_token_id, row, "<|audio_eos|> closing an audio-in-video block")
        self._expect(toks, end + 1, c.vision_end_token_id, row, "<|vision_eos|> closing an audio-in-video block")
        kinds = toks[body:end]
        is_video = kinds == c.video_token_id
        grid = _grid(self.q["video"].next(row, "video"))
        n_video, n_audio = int(is_video.sum()), int((~is_video).sum())
        want_video = vision_token_count(grid, self.merge)
        if n_video != want_video:
            raise ValueError(f"row {row}: audio-in-video block at index {i} has {n_video} video placeholders, "
                             f"video_grid_thw {grid} gives {want_video}")
        lens = self.q["audio"]
        if lens.values is not None:
            want_audio = audio_token_count(lens.next(row, "audio")) * self.audio_mult
            if n_audio != want_audio:
                raise ValueError(f"row {row}: audio-in-video block at index {i} has {n_audio} audio "
                                 f"placeholders, audio_feature_lens gives {want_audio}")
        if n_audio == 0:
            raise ValueError(f"row {row}: audio-in-video block at index {i} has no audio placeholder")
        out[:, i:body] = nxt  # both start tokens share one position
        base = nxt + 1
        t_values = _video_t_values(grid[0], self.q["spg"].next(row, "video"), c.position_id_per_seconds)
        seg = out[:, body:end]
        seg[:, is_video] = _vision_positions(grid, self.merge, t_values) + base
        seg[:, ~is_video] = np.arange(n_audio) + base
        # The end tokens follow the block's last run (not its overall maximum).
        changes = np.flatnonzero(kinds[1:] != kinds[:-1])
        last_run = int(changes[-1]) + 1 if len(changes) else 0
        eos = int(seg[:, last_run:].max()) + 1
        out[:, end:end + 2] = eos  # both end tokens share one position
        return end + 2, eos + 1


def pad_position(cfg: BackboneConfig) -> int:
    """The M-RoPE position transformers gives padded slots: 0 in Qwen2.5-VL, 1 in the Omni thinker."""
    return 0 if cfg.family == "qwen2_5_vl" else 1


def rope_index(input_ids, attention_mask, cfg: BackboneConfig, *, image_grid_thw=None, video_grid_thw=None,
               audio_feature_lens=None, second_per_grid=None, use_audio_in_video: bool = False,
               wave_doubled_audio: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids ``[3, B, S]`` and deltas ``[B]`` (int32), as transformers computes them.

    The rule is the config's family's (``_RowWalker``): Qwen2.5-Omni's
    ``Qwen2_5OmniThinkerModel.get_rope_index`` or Qwen2.5-VL's
    ``Qwen2_5_VLModel.get_rope_index`` of transformers 5 (whose ``mm_token_type_ids``
    this reads from the placeholder tokens). Rows may be left-, right- or otherwise
    padded (``attention_mask`` 1 = real token); padded slots get position 1 (Omni)
    or 0 (VL), as in transformers. Metadata is shared by
    the batch and consumed in order of appearance: ``image_grid_thw`` / ``video_grid_thw``
    ``[n, 3]``, ``second_per_grid`` ``[n_videos]``, ``audio_feature_lens`` ``[n_audios]``
    (valid mel frames; an audio-in-video track counts at its video's place). Audio
    lengths only check the placeholder counts and may be None. Every entry must
    match a placeholder block (and vice versa), each block must be wrapped in its
    start/end tokens, and counts must agree, else ValueError.

    Deviations from transformers only where it would mis-assign positions
    silently or crash: inside an audio-in-video block the video/audio order is read
    from the tokens (identical whenever the layout came from the processor's
    chunking), a plain video is accepted when ``use_audio_in_video`` is True, and a
    row with no real token is an error when any vision grid is given.
    ``wave_doubled_audio``: audio runs hold 2 placeholders per Whisper token.
    """
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, S]; got {ids.shape} and {mask.shape}")
    real = mask == 1
    has_vision = image_grid_thw is not None or video_grid_thw is not None
    if video_grid_thw is not None and second_per_grid is None:
        raise ValueError("second_per_grid is required when video_grid_thw is given")
    queues = {
        "image": _Queue("image_grid_thw", image_grid_thw, 3),
        "video": _Queue("video_grid_thw", video_grid_thw, 3),
        "spg": _Queue("second_per_grid", second_per_grid, None),
        "audio": _Queue("audio_feature_lens", audio_feature_lens, None),
    }
    walker = _RowWalker(cfg, queues, use_audio_in_video, wave_doubled_audio)
    batch, _ = ids.shape
    pos = np.full((3,) + ids.shape, pad_position(cfg), np.int64)
    deltas = np.zeros(batch, np.int64)
    for b in range(batch):
        n = int(real[b].sum())
        if n == 0:
            if has_vision:
                raise ValueError(f"row {b} has no real token (attention_mask all 0)")
            continue
        row_pos = walker.positions(ids[b, real[b]], b)
        pos[:, b, real[b]] = row_pos
        deltas[b] = row_pos.max() + 1 - n
    for q in queues.values():
        q.check_done()
    if not has_vision and not walker.vl:
        # The Omni text-only branch takes the maximum over padded slots (value 1) too.
        deltas = pos.max(axis=(0, 2)) + 1 - real.sum(axis=1)
    return pos.astype(np.int32), deltas.astype(np.int32)


# -- padding --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    input_ids: np.ndarray       # [B, S] int32
    attention_mask: np.ndarray  # [B, S] int32
    last_index: np.ndarray      # [B] int32, index of each row's last real token (last-token pooling)


def pad_batch(seqs: Sequence[Sequence[int]], length: int, pad_id: int, *, side: str = "right",
              names: Sequence[str] | None = None) -> PaddedBatch:
    """Pad token sequences to ``length``; a longer or empty sequence is an error, never truncated.

    ``side="left"`` matches the reference batches (pooled token always last);
    ``side="right"`` keeps real tokens at the same indices whatever the padding.
    ``names`` (e.g. sample ids) only label error messages.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if names is not None and len(names) != len(seqs):
        raise ValueError(f"names has {len(names)} entries for {len(seqs)} sequences")
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    last = np.zeros(len(seqs), np.int32)
    for b, seq in enumerate(seqs):
        label = f"sample {b}" + (f" ({names[b]!r})" if names is not None else "")
        n = len(seq)
        if n > length:
            raise ValueError(f"{label} has {n} tokens, longer than the padded length {length}")
        if n == 0:
            raise ValueError(f"{label} is empty")
        start = 0 if side == "right" else length - n
        ids[b, start:start + n] = np.asarray(seq, np.int32)
        mask[b, start:start + n] = 1
        last[b] = start + n - 1
    return PaddedBatch(ids, mask, last)
