"""grain input pipeline: manifest records -> decoded, featurised, fixed-shape batches.

    manifest (bad lines counted and left out, or an error: `on_bad_record`)
      -> slots of one global stream: epoch e holds a (seed, e) permutation of the records,
         global batch k = slots k*B .. k*B+B-1, this process reads its rows [start, stop)
         of every global batch                                         (MapDataset, by index)
      -> load slot s: its record, or when that record is bad, replacements drawn from
         (seed, s, attempt) (`on_bad_sample="replace"`); every random choice of the slot
         (audio crop, augmentations, the dataset text negative) is seeded by (seed, s)
      -> to_iter_dataset -> mp_prefetch(num_workers processes)       (decode + features here)
      -> accounting -> batch(stop - start rows) -> thread prefetch

Why this shape:
- The global batch (which records, in which order, their augmentations and replacements) is a
  pure function of the config and the global slot index, so it is the same whatever the number
  of processes and workers: a run reproduces across topologies, and get_state/set_state
  resumes at exactly the next batch (the skip counters travel inside that state).
- Decoding runs in worker processes, one sample at a time in each worker's main thread, where
  a SIGALRM timer bounds every sample (`sample_timeout_s`); decode.py itself bounds its loops.
- Bad input never raises. The loader returns a small skip marker (reason, id) or a documented
  fallback. With `on_bad_sample="replace"` (training: the reference replaces a failed sample
  by a random one, data_qwen.py L946-954) a bad record's slot tries up to `max_replacements`
  random records, so every batch is full and topology-independent; with "drop" (evaluation)
  the markers are counted and dropped before batching, and the batch fills from the next
  records (then `max_consecutive_skips` markers in a row raise, so a broken corpus fails
  loudly instead of spinning forever).
- Captions are tokenised here when a tokenizer is given: `caption_ids` hold at most
  `caption_tokens` tokens (the budget the trainer derives from the padded lengths), so a long
  caption is truncated (the default, counted as a fallback) or skipped, never an error later.

Reasons are "<what>/<why>": video/<MediaError.reason>, audio/<MediaError.reason>,
video|audio/out_of_range (start/end outside the media), video/too_many_patches,
caption/empty, caption/too_long (characters), caption/too_many_tokens, timeout,
error/<ExceptionType> (unexpected; re-raised when `strict=True`), manifest/<code> (a manifest
line left out, see manifest.py). Audio problems (no stream, silent, unreadable separate file)
follow `on_missing_audio`: "silence" keeps the sample with an all-zero waveform (counted
under `fallbacks`), "skip" drops it (counted under `skipped`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from omniret_jax.data import augment, decode, features
from omniret_jax.data.manifest import BadRecord, ManifestRecord, load_manifest
from omniret_jax.data.tokens import Tokens

SKIP = "__skip__"
FALLBACKS = "__fallbacks__"
TRIES = "__tries__"          # (reason, record id) of every failed try of a slot
EXHAUSTED = "__exhausted__"  # a slot whose own record and every replacement failed
_EXAMPLES_PER_REASON = 5
SAMPLE_RATE = 16000


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input settings; defaults are the OmniRetriever training recipe (architecture.md s.4)."""

    batch_size: int = 8  # global: rows of one batch over all processes
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever (each epoch reshuffled)
    # video
    num_frames: int = 8
    frame_spacing_s: float | None = None  # set to sample by spacing instead (inference: 0.5)
    max_frames: int = 128
    min_pixels: int = 50176  # the released train.sh pins min = max = 224 * 224
    max_pixels: int = 50176
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    max_patches: int | None = None  # fixed P; None derives the bound from the settings above
    # Smaller P a batch is cut to when all its clips fit (one compile each, the bound's last);
    # None: the frame-area bucket (see patch_buckets), (): the bound only (one compile).
    patch_buckets: tuple[int, ...] | None = None
    # audio (16 kHz mono: both audio towers were trained at that rate)
    audio_seconds: float = 8.0
    audio_mode: str = "start"  # "start" (reference), "center" or "random"
    on_missing_audio: str = "silence"  # or "skip"
    # text
    max_caption_chars: int = 4096
    caption_tokens: int | None = None  # token budget of caption_ids (needs a tokenizer)
    on_long_caption: str = "truncate"  # or "skip" (caption/too_many_tokens either way)
    text_negative: str = "none"  # "dataset": each sample also carries a random other record's caption
    # second, augmented view for the tuple objective
    augment: bool = False
    # the record's reference clip (``query_video``, whole) as the view ``query``: the video of a
    # text + video query (tv2v); a record without one is skipped (query_video/missing)
    query_clip: bool = False
    # bad input
    on_bad_record: str = "error"  # manifest lines: "error" (one report of all) or "skip" (counted)
    on_bad_sample: str = "drop"  # "replace" (training: topology-independent) or "drop"
    max_replacements: int = 64  # tries per slot beyond its own record before the corpus is called unusable
    # execution
    num_workers: int = 0  # 0 decodes in the calling thread
    worker_buffer_size: int = 2
    prefetch_batches: int = 2  # thread prefetch of batches (used when num_workers > 0)
    sample_timeout_s: float | None = 60.0
    max_consecutive_skips: int = 1000  # "drop" only
    strict: bool = False

    def __post_init__(self):
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if self.num_epochs is not None and self.num_epochs < 1:
            problems.append(f"num_epochs={self.num_epochs} must be >= 1 or None")
        if self.frame_spacing_s is None and not 1 <= self.num_frames <= self.max_frames:
            problems.append(f"num_frames={self.num_frames} must be in [1, max_frames={self.max_frames}]")
        if not 0 < self.min_pixels <= self.max_pixels:
            problems.append(f"need 0 < min_pixels ({self.min_pixels}) <= max_pixels ({self.max_pixels})")
        if self.audio_mode not in ("start", "center", "random"):
            problems.append(f"audio_mode={self.audio_mode!r} must be 'start', 'center' or 'random'")
        if self.on_missing_audio not in ("silence", "skip"):
            problems.append(f"on_missing_audio={self.on_missing_audio!r} must be 'silence' or 'skip'")
        if self.audio_seconds <= 0:
            problems.append(f"audio_seconds={self.audio_seconds} must be > 0")
        if self.max_caption_chars < 1:
            problems.append(f"max_caption_chars={self.max_caption_chars} must be >= 1")
        if self.caption_tokens is not None and self.caption_tokens < 1:
            problems.append(f"caption_tokens={self.caption_tokens} must be >= 1 or None")
        for name, allowed in (("on_long_caption", ("truncate", "skip")), ("text_negative", ("none", "dataset")),
                              ("on_bad_record", ("error", "skip")), ("on_bad_sample", ("replace", "drop"))):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if self.max_replacements < 0:
            problems.append(f"max_replacements={self.max_replacements} must be >= 0")
        if self.num_workers < 0 or self.worker_buffer_size < 1 or self.prefetch_batches < 0:
            problems.append("need num_workers >= 0, worker_buffer_size >= 1, prefetch_batches >= 0")
        if self.sample_timeout_s is not None and self.sample_timeout_s <= 0:
            problems.append(f"sample_timeout_s={self.sample_timeout_s} must be > 0 or None")
        if self.max_patches is not None and self.max_patches < 1:
            problems.append(f"max_patches={self.max_patches} must be >= 1 or None")
        if self.patch_buckets is not None:
            object.__setattr__(self, "patch_buckets", tuple(int(p) for p in self.patch_buckets))
            unit = self.merge_size ** 2
            bad = [p for p in self.patch_buckets if p < 1 or p % unit]
            if bad:
                problems.append(f"patch_buckets={self.patch_buckets}: {bad} are not positive multiples of "
                                f"merge_size**2={unit}")
        if problems:
            raise ValueError("bad PipelineConfig: " + "; ".join(problems))

    @property
    def temporal_grids(self) -> int:
        """Temporal patch steps of the longest clip (frames are paired)."""
        frames = self.max_frames if self.frame_spacing_s is not None else self.num_frames
        return math.ceil(frames / self.temporal_patch_size)

    @property
    def num_patches(self) -> int:
        """Fixed patch rows P per clip: the most `smart_resize` can produce at these settings.

        Each temporal step yields (h/14)*(w/14) patches. smart_resize can exceed max_pixels
        when it rounds a small or elongated frame up (64x48 at min = max = 224*224 becomes
        196x280: 280 patches, not 256), so the bound is features.max_resize_blocks over every
        accepted aspect ratio (1040 -> 2080 rows at the training settings): no clip the
        reference trains on is dropped for its size. With spacing-based sampling the frame
        count is only bounded by max_frames.
        """
        if self.max_patches is not None:
            return self.max_patches
        blocks = features.max_resize_blocks(factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                                            max_pixels=self.max_pixels)
        return self.temporal_grids * blocks * self.merge_size ** 2

    @property
    def patch_bucket_sizes(self) -> tuple[int, ...]:
        """The P a batch's video_patches may be cut to, ascending, the bound ``num_patches`` last:
        a batch takes the smallest that holds every clip of the global batch (``data.batch.
        cut_patches``), so the step compiles once per size it meets. By default one bucket below
        the bound: ``temporal_grids * floor(max_pixels / 28**2) * 4`` patches (1024 at the training
        settings), what every frame of at least max_pixels gets (smart_resize only shrinks it);
        small or sliver frames that it rounds up take the bound (2080). Without it an ordinary
        224x224 batch would pad its video rows and ViT patches to twice their length.
        """
        bound = self.num_patches
        if self.patch_buckets is None:
            factor = self.patch_size * self.merge_size
            frame = self.temporal_grids * (self.max_pixels // factor ** 2) * self.merge_size ** 2
            smaller = (frame,) if 0 < frame < bound else ()
        else:
            smaller = tuple(p for p in self.patch_buckets if p < bound)
        return tuple(sorted(set(smaller))) + (bound,)

    @property
    def max_video_tokens(self) -> int:
        """Most video placeholders (merged patches) one clip can need."""
        return self.num_patches // self.merge_size ** 2

    @property
    def mel_frames(self) -> int:
        """Whisper frames of the audio crop (the mel array's width)."""
        return features.whisper_num_frames(int(round(self.audio_seconds * SAMPLE_RATE)))


@dataclasses.dataclass
class PipelineSummary:
    """What the pipeline did with the records it read; `metrics()` is ready for a logger.

    seen: records tried (a replaced slot tries several); yielded: samples returned;
    replaced: samples standing in for a bad record (on_bad_sample="replace"); skipped and
    fallbacks by reason, with up to 5 example ids each (manifest lines as "line N")."""

    seen: int = 0
    yielded: int = 0
    replaced: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineSummary:
        return cls(seen=d["seen"], yielded=d["yielded"], replaced=d.get("replaced", 0),
                   skipped=dict(d["skipped"]), fallbacks=dict(d["fallbacks"]),
                   examples={k: list(v) for k, v in d["examples"].items()})

    def note(self, kind: str, reason: str, example: str) -> None:
        counts = self.skipped if kind == "skipped" else self.fallbacks
        counts[reason] = counts.get(reason, 0) + 1
        ids = self.examples.setdefault(f"{kind}:{reason}", [])
        if len(ids) < _EXAMPLES_PER_REASON:
            ids.append(example)

    def add(self, other: PipelineSummary) -> None:
        """Adds another pipeline's counts (and examples, up to 5 a reason) to these."""
        self.seen, self.yielded, self.replaced = (self.seen + other.seen, self.yielded + other.yielded,
                                                  self.replaced + other.replaced)
        for mine, theirs in ((self.skipped, other.skipped), (self.fallbacks, other.fallbacks)):
            for reason, n in theirs.items():
                mine[reason] = mine.get(reason, 0) + n
        for key, ids in other.examples.items():
            kept = self.examples.setdefault(key, [])
            kept.extend(ids[:_EXAMPLES_PER_REASON - len(kept)])

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        out = {f"{prefix}seen": float(self.seen), f"{prefix}yielded": float(self.yielded),
               f"{prefix}replaced": float(self.replaced),
               f"{prefix}skipped": float(sum(self.skipped.values())),
               f"{prefix}fallbacks": float(sum(self.fallbacks.values()))}
        out.update({f"{prefix}skipped/{k}": float(v) for k, v in sorted(self.skipped.items())})
        out.update({f"{prefix}fallback/{k}": float(v) for k, v in sorted(self.fallbacks.items())})
        return out

    def __str__(self) -> str:
        lines = [f"samples read {self.seen}, yielded {self.yielded} ({self.replaced} replacing a bad record), "
                 f"skipped {sum(self.skipped.values())}, fallbacks {sum(self.fallbacks.values())}"]
        for kind, counts in (("skipped", self.skipped), ("fallback", self.fallbacks)):
            for reason, n in sorted(counts.items()):
                ids = ", ".join(self.examples.get(f"{kind}:{reason}", []))
                lines.append(f"  {kind:8s} {reason:28s} {n:6d}  e.g. {ids}")
        return "\n".join(lines)


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _SampleTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raises _SampleTimeout after `seconds` (SIGALRM; only possible on the main thread)."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise _SampleTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _media_call(kind: str, fn, *args, **kwargs):
    """Runs a decode call, turning its data errors into `_Skip('<kind>/<reason>')`."""
    try:
        return fn(*args, **kwargs)
    except decode.MediaError as e:
        raise _Skip(f"{kind}/{e.reason}") from e
    except ValueError as e:  # decode raises ValueError when start/end select nothing
        raise _Skip(f"{kind}/out_of_range") from e


def _clip_seconds(path: str, start: float | None = None, end: float | None = None, kind: str = "video") -> float:
    """Length of the sampled window as the reference measures it (frame count / average fps,
    clipped to [start, end]); second_per_grid = temporal_patch_size * this / frames sampled."""
    info = _media_call(kind, decode.probe, path)
    if info.num_frames and info.fps:
        length = info.num_frames / info.fps
    else:
        length = info.duration_s
    if end is not None:
        length = min(length, end)
    return length - (start or 0.0)


# Sub-streams of a slot's randomness: np.random.default_rng([seed, slot, attempt, STREAM]).
_LOAD, _PICK, _NEG_TEXT = 0, 1, 2


class LoadSample:
    """Decodes one record and computes all features; returns a sample or a skip marker."""

    def __init__(self, config: PipelineConfig, tokens: Tokens | None = None):
        if tokens is not None and config.caption_tokens is None:
            raise ValueError("a tokenizer was given but PipelineConfig.caption_tokens is None (the caption budget)")
        self.config = config
        self.tokens = tokens

    def __call__(self, record: ManifestRecord, rng: np.random.Generator) -> dict[str, Any]:
        try:
            with _time_limit(self.config.sample_timeout_s):
                return self._load(record, rng)
        except _Skip as e:
            return {SKIP: e.reason, "id": record.id}
        except _SampleTimeout:
            return {SKIP: "timeout", "id": record.id}
        except Exception as e:  # never let one sample take the run down
            if self.config.strict:
                raise
            return {SKIP: f"error/{type(e).__name__}", "id": record.id}

    def caption_ids(self, text: str) -> tuple[np.ndarray, np.int32, bool]:
        """(ids zero-padded to caption_tokens, length, whether it was truncated)."""
        c = self.config
        ids = list(self.tokens.encode(text))
        if not ids:
            raise _Skip("caption/empty")
        truncated = len(ids) > c.caption_tokens
        if truncated and c.on_long_caption == "skip":
            raise _Skip("caption/too_many_tokens")
        ids = ids[:c.caption_tokens]
        out = np.zeros(c.caption_tokens, np.int32)
        out[:len(ids)] = ids
        return out, np.int32(len(ids)), truncated

    def _load(self, record: ManifestRecord, rng: np.random.Generator) -> dict[str, Any]:
        c = self.config
        caption = record.caption.strip()
        if not caption:
            raise _Skip("caption/empty")
        if len(caption) > c.max_caption_chars:
            raise _Skip("caption/too_long")
        fallbacks = []
        frames, _ = _media_call(
            "video", decode.decode_video, record.video, num_frames=c.num_frames,
            spacing_s=c.frame_spacing_s, max_frames=c.max_frames, start_s=record.start,
            end_s=record.end)
        try:
            wave = _media_call("audio", decode.decode_audio, record.audio or record.video,
                               sr=SAMPLE_RATE, start_s=record.start, end_s=record.end,
                               reject_silent=True)
        except _Skip as e:
            if c.on_missing_audio == "skip":
                raise
            fallbacks.append(e.reason)
            wave = np.zeros(0, np.float32)
        target = int(round(c.audio_seconds * SAMPLE_RATE))
        valid = min(wave.shape[0], target) if wave.size else target  # silence fills the crop
        wave = decode.crop_or_pad(wave, seconds=c.audio_seconds, sr=SAMPLE_RATE,
                                  mode=c.audio_mode, rng=rng)
        grid_s = c.temporal_patch_size * _clip_seconds(record.video, record.start, record.end) / frames.shape[0]
        sample = {"id": record.id, FALLBACKS: fallbacks}
        sample.update(self._view(caption, frames, wave, valid, grid_s, fallbacks, ""))
        if c.augment:
            sample["aug"] = self._view(
                augment.augment_caption(caption, rng), augment.augment_video(frames, rng),
                augment.augment_audio(wave, rng), valid, grid_s, fallbacks, "aug_")
        if c.query_clip:
            sample["query"] = self._query_view(record, sample)
        return sample

    def _query_view(self, record: ManifestRecord, sample: dict[str, Any]) -> dict[str, Any]:
        """The reference clip of a text + video query, sampled as a record's own clip, with the
        record's caption (its tokens as ``sample`` holds them). No audio: the query is its text
        and this clip's frames."""
        c = self.config
        if record.query_video is None:
            raise _Skip("query_video/missing")
        frames, _ = _media_call("query_video", decode.decode_video, record.query_video, num_frames=c.num_frames,
                                spacing_s=c.frame_spacing_s, max_frames=c.max_frames)
        grid_s = c.temporal_patch_size * _clip_seconds(record.query_video, kind="query_video") / frames.shape[0]
        text = {k: sample[k] for k in ("caption", "caption_ids", "caption_len") if k in sample}
        return text | self._video_keys(frames, grid_s)

    def _view(self, caption: str, frames: np.ndarray, wave: np.ndarray, valid: int, grid_s: float,
              fallbacks: list[str], tag: str) -> dict[str, Any]:
        out = {"caption": caption, **self._caption_keys(caption, fallbacks, tag), **self._video_keys(frames, grid_s)}
        mel = features.whisper_log_mel(wave)
        fbank = features.beats_fbank(wave)
        hop, win = SAMPLE_RATE // 100, SAMPLE_RATE * 25 // 1000  # kaldi 10 ms / 25 ms
        out.update({
            "mel": np.asarray(mel, np.float32),
            "mel_len": np.int32(features.whisper_num_frames(valid)),
            "fbank": np.asarray(fbank, np.float32),
            "fbank_len": np.int32(min(fbank.shape[0], max(0, 1 + (valid - win) // hop))),
        })
        return out

    def _caption_keys(self, caption: str, fallbacks: list[str], tag: str) -> dict[str, Any]:
        if self.tokens is None:
            return {}
        ids, n, truncated = self.caption_ids(caption)
        if truncated:
            fallbacks.append(f"caption/{tag}too_many_tokens")
        return {"caption_ids": ids, "caption_len": n}

    def _video_keys(self, frames: np.ndarray, grid_s: float) -> dict[str, Any]:
        c = self.config
        patches, grid_thw = features.vision_patches(
            frames, min_pixels=c.min_pixels, max_pixels=c.max_pixels, patch_size=c.patch_size,
            temporal_patch_size=c.temporal_patch_size, merge_size=c.merge_size)
        n = patches.shape[0]
        if n > c.num_patches:  # only with an explicit max_patches below the smart_resize bound
            raise _Skip("video/too_many_patches")
        padded = np.zeros((c.num_patches, patches.shape[1]), np.float32)
        padded[:n] = patches
        return {"video_patches": padded, "video_num_patches": np.int32(n),
                "video_grid_thw": np.asarray(grid_thw, np.int32).reshape(3),
                "video_second_per_grid": np.float32(grid_s)}


class _LoadSlot(grain.transforms.Map):
    """Local index -> the sample of its global slot (see the module docstring).

    Local index i of this process is row ``start + i % rows`` of global batch ``i // rows``;
    its slot ``s = (i // rows) * B + start + i % rows``. Epoch ``s // N`` visits the N records
    in a (seed, epoch) permutation. With on_bad_sample="replace" a failed record is replaced
    by records drawn from (seed, s, attempt), each loaded with its own (seed, s, attempt) rng.
    """

    def __init__(self, records: Sequence[ManifestRecord], config: PipelineConfig, tokens: Tokens | None,
                 rows: tuple[int, int], layout=None):
        self.records = list(records)
        self.config = config
        self.load = LoadSample(config, tokens)
        self.layout = layout
        self.start, self.rows = rows[0], rows[1] - rows[0]
        self._perm: tuple[int, np.ndarray] | None = None

    def slot(self, i: int) -> int:
        k, j = divmod(int(i), self.rows)
        return k * self.config.batch_size + self.start + j

    def record_index(self, slot: int) -> int:
        c, n = self.config, len(self.records)
        epoch, pos = divmod(slot, n)
        if not c.shuffle:
            return pos
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([c.seed, epoch]).permutation(n))
        return int(self._perm[1][pos])

    def map(self, i: int) -> dict[str, Any]:
        c = self.config
        s = self.slot(i)
        index = self.record_index(s)
        tries: list[tuple[str, str]] = []
        attempts = 1 + (c.max_replacements if c.on_bad_sample == "replace" else 0)
        for attempt in range(attempts):
            if attempt:
                index = int(np.random.default_rng([c.seed, s, attempt, _PICK]).integers(len(self.records)))
            record = self.records[index]
            sample = self.load(record, np.random.default_rng([c.seed, s, attempt, _LOAD]))
            if SKIP not in sample:
                sample[TRIES] = tries
                if c.text_negative == "dataset":
                    self._text_negative(sample, s, index)
                return sample if self.layout is None else self.layout(sample)
            tries.append((sample[SKIP], record.id))
        if c.on_bad_sample == "drop":
            return {SKIP: tries[-1][0], "id": tries[-1][1], TRIES: tries[:-1]}
        return {EXHAUSTED: s, TRIES: tries}

    def _text_negative(self, sample: dict[str, Any], slot: int, own: int) -> None:
        """The released recipe's text hard negative: another record's caption, drawn from the
        whole dataset (data_qwen.py L850-853), tokenised like the sample's own but never
        skipped (an over-long one is truncated and counted; an empty one is drawn again)."""
        n, c, tokens = len(self.records), self.config, self.load.tokens
        if n < 2:
            raise ValueError("text_negative='dataset' needs at least 2 records")
        for attempt in range(64):
            j = int(np.random.default_rng([c.seed, slot, attempt, _NEG_TEXT]).integers(n - 1))
            text = self.records[j + (j >= own)].caption.strip()
            ids = list(tokens.encode(text)) if tokens is not None and text else []
            if text and (tokens is None or ids):
                break
        else:
            raise ValueError(f"slot {slot}: 64 random records in a row have empty captions (text negative)")
        if tokens is None:
            sample["neg_caption"] = text
            return
        if len(ids) > c.caption_tokens:
            sample[FALLBACKS].append("caption/neg_too_many_tokens")
            ids = ids[:c.caption_tokens]
        sample["neg_caption_ids"] = np.zeros(c.caption_tokens, np.int32)
        sample["neg_caption_ids"][:len(ids)] = ids
        sample["neg_caption_len"] = np.int32(len(ids))


class _AccountingIterDataset(grain.IterDataset):
    """Counts failed tries and fallbacks by reason and drops skip markers ("drop" mode)."""

    def __init__(self, parent: grain.IterDataset, max_consecutive_skips: int):
        super().__init__(parent)
        self._max_consecutive_skips = max_consecutive_skips

    def __iter__(self):
        return _AccountingIterator(self._parent.__iter__(), self._max_consecutive_skips)


class _AccountingIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive_skips: int):
        super().__init__(parent)
        self._max = max_consecutive_skips
        self._summary = PipelineSummary()

    def __next__(self):
        s = self._summary
        consecutive = 0
        while True:
            element = next(self._parent)
            tries = element.pop(TRIES, [])
            for reason, rid in tries:
                s.seen += 1
                s.note("skipped", reason, rid)
            if EXHAUSTED in element:
                raise RuntimeError(f"slot {element[EXHAUSTED]}: its record and {len(tries) - 1} random "
                                   f"replacements all failed; the corpus looks unusable.\n{s}")
            s.seen += 1
            if SKIP in element:
                s.note("skipped", element[SKIP], element["id"])
                consecutive += 1
                if consecutive >= self._max:
                    raise RuntimeError(f"{consecutive} consecutive samples were skipped; the corpus "
                                       f"looks unusable.\n{s}")
                continue
            for reason in element.pop(FALLBACKS):
                s.note("fallback", reason, element["id"])
            s.replaced += bool(tries)
            s.yielded += 1
            return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(),
                "summary": dataclasses.asdict(self._summary)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._summary = PipelineSummary.from_dict(state["summary"])


def _collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks arrays along a new batch axis; strings and tuples (per-row token layouts of
    differing lengths) become lists."""
    out = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if isinstance(first, dict):
            out[key] = _collate(values)
        elif isinstance(first, (str, tuple)):
            out[key] = values
        else:
            out[key] = np.stack(values)
    return out


def _ensure_absl_flags_parsed() -> None:
    """grain's worker start-up reads absl flags and fails when a program never parsed them
    (plain scripts, pytest); marking them parsed keeps every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _close_quietly(iterator) -> None:
    try:
        iterator.close()
    except Exception as e:  # a worker that already died; nothing left to release
        import logging

        logging.getLogger(__name__).debug("closing the input pipeline: %s", e)
    # Samples still buffered between the workers and the batcher hold shared-memory blocks that
    # are unlinked when they are deleted: collect them now, not in the resource tracker at exit.
    import gc

    gc.collect()


def process_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows [start, stop) of a global batch that process ``process_index`` reads when the
    processes split it into equal contiguous parts."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"global batch {batch_size} does not split over {process_count} processes")
    b = batch_size // process_count
    return process_index * b, (process_index + 1) * b


class DataPipeline:
    """Iterator of fixed-shape training batches with checkpointable state and a bad-input summary.

    Batch (b = rows of this process, P = config.num_patches, L = config.caption_tokens):
        id, caption                 list[str] of length b
        caption_ids, caption_len    int32 [b, L], int32 [b] (with a tokenizer)
        video_patches               float32 [b, P, 1176], zero rows past video_num_patches
        video_num_patches           int32 [b]
        video_grid_thw              int32 [b, 3]
        video_second_per_grid       float32 [b]
        mel                         float32 [b, 128, 800] (8 s), mel_len int32 [b]
        fbank                       float32 [b, 798, 128] (8 s), fbank_len int32 [b]
        neg_caption_ids, neg_caption_len   another record's caption (text_negative="dataset")
        aug                         the same keys (no id) for the augmented view, if configured
        query                       caption and video keys of the record's reference clip
                                    (``query_video``), with ``query_clip``
    mel_len/fbank_len count the frames that cover decoded audio; a clip shorter than the crop
    is zero-padded at its end (silence fallbacks count as full length). The reference's feature
    mask spans the whole padded crop, so a layout that mirrors it uses the full width instead.

    ``rows=(start, stop)`` is this process's part of every global batch of ``batch_size``
    rows; ``process_index``/``process_count`` give equal contiguous parts (default: this JAX
    process of all). A manifest path is read with ``config.on_bad_record``; its bad lines
    are in the summary as ``manifest/<code>``. ``layout``: a picklable function applied to
    every loaded sample in the worker (the trainer's ``batch.add_row_layouts``: the per-row token
    layouts, off the training process).
    """

    def __init__(self, records: Sequence[ManifestRecord] | str | os.PathLike,
                 config: PipelineConfig, *, tokens: Tokens | None = None, rows: tuple[int, int] | None = None,
                 process_index: int | None = None, process_count: int | None = None, layout=None):
        self._bad: list[BadRecord] = []
        if isinstance(records, (str, os.PathLike)):
            manifest = load_manifest(records, on_bad_record=config.on_bad_record)
            records, self._bad = manifest.records, manifest.bad
        records = list(records)
        if not records:
            raise ValueError("DataPipeline needs at least one record")
        c = self.config = config
        if rows is None:
            if process_index is None or process_count is None:
                import jax

                process_index = jax.process_index() if process_index is None else process_index
                process_count = jax.process_count() if process_count is None else process_count
            if len(records) < process_count:
                raise ValueError(f"{len(records)} records cannot feed {process_count} processes")
            rows = process_rows(c.batch_size, process_index, process_count)
        start, stop = rows
        if not 0 <= start < stop <= c.batch_size:
            raise ValueError(f"rows={rows} is not a non-empty part of a batch of {c.batch_size}")
        self.rows = (start, stop)
        if c.num_workers > 0:
            _ensure_absl_flags_parsed()
        if c.num_epochs is None:
            length = sys.maxsize // c.batch_size * (stop - start)
        else:
            length = len(records) * c.num_epochs // c.batch_size * (stop - start)
        if length == 0:
            raise ValueError(f"{len(records)} records x {c.num_epochs} epoch(s) do not fill one global batch "
                             f"of {c.batch_size}")
        ds = grain.MapDataset.source(range(length)).map(_LoadSlot(records, c, tokens, self.rows, layout))
        # No reader threads: each process decodes one sample at a time on its main thread,
        # which is where the SIGALRM sample timer can fire.
        stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=c.num_workers, per_worker_buffer_size=c.worker_buffer_size))
        stream = _AccountingIterDataset(stream, c.max_consecutive_skips)
        stream = stream.batch(stop - start, drop_remainder=True, batch_fn=_collate)
        if c.num_workers > 0 and c.prefetch_batches > 0:
            # With workers the main process only batches, so a thread can run ahead; without
            # workers decoding stays on the calling thread, where the sample timer works.
            stream = grain.experimental.ThreadPrefetchIterDataset(
                stream, prefetch_buffer_size=c.prefetch_batches)
        self._iterator = stream.__iter__()
        # Closing stops the worker processes, unlinks their shared memory and joins the prefetch
        # thread. A pipeline that is never closed is closed when it is collected or, at the
        # latest, at interpreter exit while modules are still intact (atexit): grain's own
        # __del__ would run after module teardown and print tracebacks, and leak shared memory.
        self._finalizer = weakref.finalize(self, _close_quietly, self._iterator)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._iterator)

    @property
    def bad_records(self) -> list[BadRecord]:
        """Manifest lines left out (on_bad_record="skip")."""
        return list(self._bad)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state; restoring it yields exactly the batches that would follow."""
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def summary(self, state: dict[str, Any] | None = None) -> PipelineSummary:
        """Counts up to the last batch returned, or up to the batch ``state`` (a ``get_state()``)
        was taken after (the same state a checkpoint saves; batching and the thread prefetch
        pass the accounting stage's state through), plus the manifest lines left out."""
        s = PipelineSummary.from_dict((self.get_state() if state is None else state)["summary"])
        for bad in self._bad:
            s.note("skipped", f"manifest/{bad.code}", f"line {bad.line}")
        return s

    def close(self) -> None:
        """Stops the worker processes and the prefetch thread (idempotent). Closing explicitly,
        rather than leaving it to garbage collection at interpreter exit, is what keeps grain's
        iterators from printing ``DatasetIterator.__del__`` tracebacks."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
