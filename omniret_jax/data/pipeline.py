"""grain input pipeline: manifest records -> decoded, featurised, fixed-shape batches.

    MapDataset.source(records) -> shuffle(seed) -> [process_index::process_count]
      -> repeat(num_epochs) -> random_map(load one sample)          (MapDataset, index-seeded)
      -> to_iter_dataset -> mp_prefetch(num_workers processes)       (decode + features here)
      -> skip/fallback accounting -> batch(batch_size, drop_remainder) -> thread prefetch

Why this shape:
- Everything random (shuffle, audio crop, augmentations) is seeded by (seed, element index),
  so the stream is a pure function of the config and the iterator state; get_state/set_state
  resumes at exactly the next batch, and the skip counters travel inside that state.
- Decoding runs in worker processes, one sample at a time in each worker's main thread, where
  a SIGALRM timer bounds every sample (`sample_timeout_s`); decode.py itself bounds its loops.
- Bad input never raises: the loader returns a small skip marker (reason, id) or a documented
  fallback, the accounting stage counts both by reason and drops the markers *before*
  batching, so batches always have `batch_size` rows filled from the next records. Only when
  `max_consecutive_skips` markers arrive in a row (a corpus that is all bad) does it raise, so a
  broken corpus fails loudly instead of spinning forever.

Reasons are "<what>/<why>": video/<MediaError.reason>, audio/<MediaError.reason>,
video|audio/out_of_range (start/end outside the media), video/too_many_patches,
caption/empty, caption/too_long, timeout, error/<ExceptionType> (unexpected; re-raised when
`strict=True`). Audio problems (no stream, silent, unreadable separate file) follow
`on_missing_audio`: "silence" keeps the sample with an all-zero waveform (counted under
`fallbacks`), "skip" drops it (counted under `skipped`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from omniret_jax.data import augment, decode, features
from omniret_jax.data.manifest import ManifestRecord, read_manifest

SKIP = "__skip__"
FALLBACKS = "__fallbacks__"
_EXAMPLES_PER_REASON = 5
SAMPLE_RATE = 16000


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input settings; defaults are the OmniRetriever training recipe (architecture.md s.4)."""

    batch_size: int = 8
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
    # audio (16 kHz mono: both audio towers were trained at that rate)
    audio_seconds: float = 8.0
    audio_mode: str = "start"  # "start" (reference), "center" or "random"
    on_missing_audio: str = "silence"  # or "skip"
    # text
    max_caption_chars: int = 4096
    # second, augmented view for the tuple objective
    augment: bool = False
    # execution
    num_workers: int = 0  # 0 decodes in the calling thread
    worker_buffer_size: int = 2
    prefetch_batches: int = 2  # thread prefetch of batches (used when num_workers > 0)
    sample_timeout_s: float | None = 60.0
    max_consecutive_skips: int = 1000
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
        if self.num_workers < 0 or self.worker_buffer_size < 1 or self.prefetch_batches < 0:
            problems.append("need num_workers >= 0, worker_buffer_size >= 1, prefetch_batches >= 0")
        if self.sample_timeout_s is not None and self.sample_timeout_s <= 0:
            problems.append(f"sample_timeout_s={self.sample_timeout_s} must be > 0 or None")
        if self.max_patches is not None and self.max_patches < 1:
            problems.append(f"max_patches={self.max_patches} must be >= 1 or None")
        if problems:
            raise ValueError("bad PipelineConfig: " + "; ".join(problems))

    @property
    def num_patches(self) -> int:
        """Fixed patch rows P per clip: the most `smart_resize` can produce under max_pixels.

        Each kept pair of frames yields (h/14)*(w/14) patches with h*w <= max_pixels. With
        spacing-based sampling the frame count is only bounded by max_frames.
        """
        if self.max_patches is not None:
            return self.max_patches
        frames = self.max_frames if self.frame_spacing_s is not None else self.num_frames
        t = math.ceil(frames / self.temporal_patch_size)
        return t * (self.max_pixels // (self.patch_size * self.patch_size))


@dataclasses.dataclass
class PipelineSummary:
    """What the pipeline did with the records it read; `metrics()` is ready for a logger."""

    seen: int = 0
    yielded: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineSummary:
        return cls(seen=d["seen"], yielded=d["yielded"], skipped=dict(d["skipped"]),
                   fallbacks=dict(d["fallbacks"]),
                   examples={k: list(v) for k, v in d["examples"].items()})

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        out = {f"{prefix}seen": float(self.seen), f"{prefix}yielded": float(self.yielded),
               f"{prefix}skipped": float(sum(self.skipped.values())),
               f"{prefix}fallbacks": float(sum(self.fallbacks.values()))}
        out.update({f"{prefix}skipped/{k}": float(v) for k, v in sorted(self.skipped.items())})
        out.update({f"{prefix}fallback/{k}": float(v) for k, v in sorted(self.fallbacks.items())})
        return out

    def __str__(self) -> str:
        lines = [f"samples read {self.seen}, yielded {self.yielded}, "
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


def _clip_seconds(record: ManifestRecord) -> float:
    """Length of the sampled window as the reference measures it (frame count / average fps,
    clipped to [start, end]); second_per_grid = temporal_patch_size * this / frames sampled."""
    info = _media_call("video", decode.probe, record.video)
    if info.num_frames and info.fps:
        length = info.num_frames / info.fps
    else:
        length = info.duration_s
    if record.end is not None:
        length = min(length, record.end)
    return length - (record.start or 0.0)


class LoadSample(grain.transforms.RandomMap):
    """Decodes one record and computes all features; returns a sample or a skip marker."""

    def __init__(self, config: PipelineConfig):
        self.config = config

    def random_map(self, record: ManifestRecord, rng: np.random.Generator) -> dict[str, Any]:
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

    def _load(self, record: ManifestRecord, rng: np.random.Generator) -> dict[str, Any]:
        c = self.config
        caption = record.caption.strip()
        if not caption:
            raise _Skip("caption/empty")
        if len(caption) > c.max_caption_chars:
            raise _Skip("caption/too_long")
        frames, _ = _media_call(
            "video", decode.decode_video, record.video, num_frames=c.num_frames,
            spacing_s=c.frame_spacing_s, max_frames=c.max_frames, start_s=record.start,
            end_s=record.end)
        fallbacks = []
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
        grid_s = c.temporal_patch_size * _clip_seconds(record) / frames.shape[0]
        sample = {"id": record.id, FALLBACKS: fallbacks}
        sample.update(self._view(caption, frames, wave, valid, grid_s))
        if c.augment:
            sample["aug"] = self._view(
                augment.augment_caption(caption, rng), augment.augment_video(frames, rng),
                augment.augment_audio(wave, rng), valid, grid_s)
        return sample

    def _view(self, caption: str, frames: np.ndarray, wave: np.ndarray, valid: int,
              grid_s: float) -> dict[str, Any]:
        c = self.config
        patches, grid_thw = features.vision_patches(
            frames, min_pixels=c.min_pixels, max_pixels=c.max_pixels, patch_size=c.patch_size,
            temporal_patch_size=c.temporal_patch_size, merge_size=c.merge_size)
        n = patches.shape[0]
        if n > c.num_patches:
            raise _Skip("video/too_many_patches")
        padded = np.zeros((c.num_patches, patches.shape[1]), np.float32)
        padded[:n] = patches
        mel = features.whisper_log_mel(wave)
        fbank = features.beats_fbank(wave)
        hop, win = SAMPLE_RATE // 100, SAMPLE_RATE * 25 // 1000  # kaldi 10 ms / 25 ms
        return {
            "caption": caption,
            "video_patches": padded,
            "video_num_patches": np.int32(n),
            "video_grid_thw": np.asarray(grid_thw, np.int32).reshape(3),
            "video_second_per_grid": np.float32(grid_s),
            "mel": np.asarray(mel, np.float32),
            "mel_len": np.int32(features.whisper_num_frames(valid)),
            "fbank": np.asarray(fbank, np.float32),
            "fbank_len": np.int32(min(fbank.shape[0], max(0, 1 + (valid - win) // hop))),
        }


class _AccountingIterDataset(grain.IterDataset):
    """Counts skip markers and fallbacks by reason and drops the markers."""

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

    def _note(self, kind: str, counts: dict[str, int], reason: str, sample_id: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        ids = self._summary.examples.setdefault(f"{kind}:{reason}", [])
        if len(ids) < _EXAMPLES_PER_REASON:
            ids.append(sample_id)

    def __next__(self):
        s = self._summary
        consecutive = 0
        while True:
            element = next(self._parent)
            s.seen += 1
            if SKIP in element:
                self._note("skipped", s.skipped, element[SKIP], element["id"])
                consecutive += 1
                if consecutive >= self._max:
                    raise RuntimeError(f"{consecutive} consecutive samples were skipped; the corpus "
                                       f"looks unusable.\n{s}")
                continue
            for reason in element.pop(FALLBACKS):
                self._note("fallback", s.fallbacks, reason, element["id"])
            s.yielded += 1
            return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(),
                "summary": dataclasses.asdict(self._summary)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._summary = PipelineSummary.from_dict(state["summary"])


def _collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks arrays along a new batch axis; strings become lists (tokenised elsewhere)."""
    out = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if isinstance(first, dict):
            out[key] = _collate(values)
        elif isinstance(first, str):
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


class DataPipeline:
    """Iterator of fixed-shape training batches with checkpointable state and a bad-input summary.

    Batch (B = batch_size, P = config.num_patches):
        id, caption                 list[str] of length B
        video_patches               float32 [B, P, 1176], zero rows past video_num_patches
        video_num_patches           int32 [B]
        video_grid_thw              int32 [B, 3]
        video_second_per_grid       float32 [B]
        mel                         float32 [B, 128, 800] (8 s), mel_len int32 [B]
        fbank                       float32 [B, 798, 128] (8 s), fbank_len int32 [B]
        aug                         the same keys (no id) for the augmented view, if configured
    mel_len/fbank_len count the frames that cover decoded audio; a clip shorter than the crop
    is zero-padded at its end (silence fallbacks count as full length). The reference's feature
    mask spans the whole padded crop, so a layout that mirrors it uses the full width instead.
    """

    def __init__(self, records: Sequence[ManifestRecord] | str | os.PathLike,
                 config: PipelineConfig, *, process_index: int | None = None,
                 process_count: int | None = None):
        if isinstance(records, (str, os.PathLike)):
            records = read_manifest(records)
        records = list(records)
        if not records:
            raise ValueError("DataPipeline needs at least one record")
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if len(records) < process_count:
            raise ValueError(f"{len(records)} records cannot feed {process_count} processes")
        self.config = config
        c = config
        if c.num_workers > 0:
            _ensure_absl_flags_parsed()
        ds = grain.MapDataset.source(records)
        if c.shuffle:
            ds = ds.shuffle(seed=c.seed)
        ds = ds[process_index::process_count]
        ds = ds.repeat(c.num_epochs)
        ds = ds.random_map(LoadSample(c), seed=c.seed)
        # No reader threads: each process decodes one sample at a time on its main thread,
        # which is where the SIGALRM sample timer can fire.
        stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=c.num_workers, per_worker_buffer_size=c.worker_buffer_size))
        stream = _AccountingIterDataset(stream, c.max_consecutive_skips)
        stream = stream.batch(c.batch_size, drop_remainder=True, batch_fn=_collate)
        if c.num_workers > 0 and c.prefetch_batches > 0:
            # With workers the main process only batches, so a thread can run ahead; without
            # workers decoding stays on the calling thread, where the sample timer works.
            stream = grain.experimental.ThreadPrefetchIterDataset(
                stream, prefetch_buffer_size=c.prefetch_batches)
        self._iterator = stream.__iter__()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state; restoring it yields exactly the batches that would follow."""
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def summary(self) -> PipelineSummary:
        """Counts up to the last batch returned (read from the same state a checkpoint saves;
        batching and the thread prefetch pass the accounting stage's state through)."""
        return PipelineSummary.from_dict(self.get_state()["summary"])

    def close(self) -> None:
        self._iterator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
