"""Media decoding with PyAV only (no ffmpeg binary, decord or tensorflow-io).

Every failure a data loader can meet in the wild is raised as :class:`MediaError` with a
machine-readable ``reason`` so that a pipeline can skip or count bad samples instead of
crashing or hanging. All loops run over the container's finite packet list and are
additionally capped, so truncated or malformed files terminate.

Timestamps are in seconds on the container clock with the container's ``start_time`` as
zero, so video timestamps and audio ``start_s``/``end_s`` windows refer to the same time
axis.
"""

from __future__ import annotations

import dataclasses
import math
import os

import av
import numpy as np

REASONS = (
    "missing_file",
    "empty_file",
    "corrupt",
    "no_video_stream",
    "no_audio_stream",
    "unsupported_codec",
    "silent_audio",
)

# Audio decoding seeks this far before a requested start, then trims.
_AUDIO_SEEK_MARGIN_S = 1.0

# Hard caps that keep every demux loop finite even if a broken container never reports EOF:
# a decode pass after indexing may read this many packets beyond the indexed count, and a
# pass without an index this many beyond the header's declared count.
_PACKET_SLACK = 4096
_UNINDEXED_PACKET_CAP = 1_000_000


class MediaError(Exception):
    """A media file that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, path: str | os.PathLike, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown MediaError reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.path = os.fspath(path)
        self.detail = detail
        super().__init__(f"{reason}: {self.path}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` learns from the container headers without decoding."""

    duration_s: float
    has_video: bool
    has_audio: bool
    fps: float | None
    width: int | None
    height: int | None
    num_frames: int | None
    sample_rate: int | None
    audio_channels: int | None


def _check_path(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError("missing_file", path)
    if os.path.getsize(path) == 0:
        raise MediaError("empty_file", path)
    return path


def _open(path) -> av.container.InputContainer:
    path = _check_path(path)
    try:
        return av.open(path, mode="r", metadata_errors="ignore")
    except (av.error.DecoderNotFoundError, av.error.PatchWelcomeError) as e:
        raise MediaError("unsupported_codec", path, str(e)) from e
    except (av.error.FFmpegError, EOFError) as e:
        raise MediaError("corrupt", path, str(e)) from e


def _clock_origin(container) -> float:
    return (container.start_time or 0) / av.time_base


def _stream_duration_s(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        start = stream.start_time or 0
        return float((start + stream.duration) * stream.time_base) - _clock_origin(container)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _check_decoder(path, stream) -> None:
    if stream.codec_context is None:
        raise MediaError("unsupported_codec", path, f"no decoder for {stream.type} stream {stream.index}")


def probe(path) -> MediaInfo:
    """Read stream metadata (duration, fps, size, sample rate); raises :class:`MediaError`."""
    container = _open(path)
    try:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        if container.duration is not None:
            duration = container.duration / av.time_base
        else:
            durations = [d for s in (video, audio) if s is not None if (d := _stream_duration_s(container, s))]
            duration = max(durations, default=0.0)
        fps = width = height = frames = sr = channels = None
        if video is not None:
            rate = video.average_rate or video.guessed_rate
            fps = float(rate) if rate else None
            if video.codec_context is not None:  # unknown codecs expose no geometry
                width, height = video.codec_context.width, video.codec_context.height
            frames = video.frames or None
        if audio is not None:
            if audio.codec_context is not None:
                sr = audio.codec_context.sample_rate
                channels = audio.codec_context.channels
        return MediaInfo(
            duration_s=float(duration),
            has_video=video is not None,
            has_audio=audio is not None,
            fps=fps,
            width=width,
            height=height,
            num_frames=frames,
            sample_rate=sr,
            audio_channels=channels,
        )
    finally:
        container.close()


def _index_video(path, container, stream) -> np.ndarray:
    """Presentation timestamps (stream ticks, sorted) of every video frame, from demuxing only.

    Demuxing reads packet headers without decoding, so this is cheap, and it gives the true
    frame count even where the header's count is missing. A file whose packets stop short of
    the count its header declares was truncated.
    """
    stamps = []
    cap = (stream.frames or 0) + _UNINDEXED_PACKET_CAP
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                raise MediaError("corrupt", path, "video packet without timestamps")
            stamps.append(ts)
            if len(stamps) > cap:
                raise MediaError("corrupt", path, "runaway packet stream")
    except av.error.FFmpegError as e:
        raise MediaError("corrupt", path, f"demux failed: {e}") from e
    if not stamps:
        raise MediaError("corrupt", path, "video stream has no packets")
    if stream.frames and len(stamps) < stream.frames:
        raise MediaError("corrupt", path, f"truncated: {len(stamps)} of {stream.frames} video frames present")
    return np.unique(np.asarray(stamps, dtype=np.int64))


def _select_indices(
    times: np.ndarray,
    fps: float,
    *,
    num_frames,
    spacing_s,
    max_frames: int,
    min_frames: int,
    spacing_like_reference: bool,
) -> np.ndarray:
    """Indices into ``times`` (sorted frame times of the window) to decode.

    Uniform: ``floor(linspace(0, n - 1, num_frames))``, the reference's
    ``np.linspace(..., dtype=int)``. Fixed spacing: the frame on screen at
    ``t0, t0 + s, t0 + 2s, ...`` up to the window's last frame, at most ``max_frames``
    (fewer than ``min_frames`` falls back to ``min_frames`` uniform frames). With
    ``spacing_like_reference`` the count is the reference's ``round(duration / s)``, clamped to
    [min_frames, max_frames], spread by the same linspace (spacing only ~``s``).
    """
    n = times.shape[0]
    if spacing_s is None:
        if num_frames is None or num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 (or give spacing_s), got {num_frames}")
        if num_frames > max_frames:
            raise ValueError(f"num_frames={num_frames} exceeds max_frames={max_frames}")
        count = int(num_frames)
    elif spacing_s <= 0:
        raise ValueError(f"spacing_s must be > 0, got {spacing_s}")
    elif spacing_like_reference:
        count = int(min(max(round((n / fps) / spacing_s), min_frames), max_frames))
    else:
        count = min(int((times[-1] - times[0]) / spacing_s + 1e-9) + 1, max_frames)
        if count >= min_frames:
            targets = times[0] + spacing_s * np.arange(count)
            return np.searchsorted(times, targets + 1e-6, side="right") - 1
        count = min_frames
    return np.floor(np.linspace(0, n - 1, count)).astype(np.int64)


def decode_video(
    path,
    *,
    num_frames: int | None = 8,
    spacing_s: float | None = None,
    max_frames: int = 128,
    start_s: float | None = None,
    end_s: float | None = None,
    min_frames: int = 1,
    spacing_like_reference: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode sampled RGB frames: ``(uint8 [T, H, W, 3], timestamps float64 [T])``.

    ``spacing_s`` (when given) selects fixed-spacing sampling (one frame per ``spacing_s``
    seconds, at most ``max_frames``) and ``num_frames`` is ignored; otherwise ``num_frames``
    frames are spread uniformly over the clip (see :func:`_select_indices`). ``start_s``/``end_s``
    restrict sampling to frames with ``start_s <= t < end_s``. Only the selected frames are
    converted to RGB, and decoding stops after the last one. ``threads`` turns on FFmpeg
    frame threading with that many threads (0: one per core); the default (None) keeps
    PyAV's single-threaded frame decoding, the right choice inside multi-process loaders.
    """
    if max_frames < 1 or min_frames < 1 or min_frames > max_frames:
        raise ValueError(f"need 1 <= min_frames <= max_frames, got min_frames={min_frames}, max_frames={max_frames}")
    container = _open(path)
    path = os.fspath(path)
    try:
        if not container.streams.video:
            raise MediaError("no_video_stream", path)
        stream = container.streams.video[0]
        _check_decoder(path, stream)
        if threads is not None:
            if threads < 0:
                raise ValueError(f"threads must be >= 0, got {threads}")
            stream.codec_context.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
        tb = stream.time_base
        origin = _clock_origin(container)
        stamps = _index_video(path, container, stream)
        times = stamps.astype(np.float64) * float(tb) - origin

        in_window = np.ones(len(times), dtype=bool)
        if start_s is not None:
            in_window &= times >= start_s - 1e-9
        if end_s is not None:
            if start_s is not None and end_s <= start_s:
                raise ValueError(f"end_s={end_s} must be > start_s={start_s}")
            in_window &= times < end_s - 1e-9
        window = np.flatnonzero(in_window)
        if window.size == 0:
            span = f"{times[0]:.3f}-{times[-1]:.3f} s"
            raise ValueError(f"no video frames in [{start_s}, {end_s}) of {path} (frames span {span})")
        rate = stream.average_rate or stream.guessed_rate
        if rate:
            fps = float(rate)
        elif len(times) > 1:
            fps = (len(times) - 1) / (times[-1] - times[0])
        else:
            fps = 1.0
        picks = window[
            _select_indices(
                times[window],
                fps,
                num_frames=num_frames,
                spacing_s=spacing_s,
                max_frames=max_frames,
                min_frames=min_frames,
                spacing_like_reference=spacing_like_reference,
            )
        ]
        wanted = {int(stamps[i]): None for i in picks}
        last_wanted = int(stamps[picks[-1]])

        rgb = _decode_selected(path, container, stream, wanted, int(stamps[picks[0]]), last_wanted, len(stamps))
        frames = np.stack([rgb[int(stamps[i])] for i in picks])
        return frames, times[picks].astype(np.float64)
    finally:
        container.close()


def _decode_selected(path, container, stream, wanted: dict, first_pts: int, last_pts: int, n_packets: int) -> dict:
    """RGB of the frames whose pts are in ``wanted``, decoding from the keyframe before ``first_pts``.

    Containers with imprecise seeking (MPEG-TS) can land after ``first_pts`` or mid-GOP; any
    frame still missing is then decoded in a second pass from the start of the file.
    """
    for from_start in (False, True):
        try:
            if from_start:
                container.seek(0)
            else:
                container.seek(first_pts, stream=stream, backward=True, any_frame=False)
            _decode_pass(path, container, stream, wanted, last_pts, n_packets)
        except av.error.FFmpegError as e:
            raise MediaError("corrupt", path, f"decode failed: {e}") from e
        if all(v is not None for v in wanted.values()):
            return wanted
    missing = sum(v is None for v in wanted.values())
    raise MediaError("corrupt", path, f"{missing} sampled frames could not be decoded")


def _decode_pass(path, container, stream, wanted: dict, last_pts: int, n_packets: int) -> None:
    """Decode forward from the current position until ``last_pts``, filling ``wanted``."""
    size = next(((v.shape[1], v.shape[0]) for v in wanted.values() if v is not None), None)
    budget = n_packets + _PACKET_SLACK
    for packet in container.demux(stream):
        budget -= 1
        if budget < 0:
            raise MediaError("corrupt", path, "runaway decode loop")
        done = False
        for frame in packet.decode():
            ts = frame.pts if frame.pts is not None else frame.dts
            if ts is None:
                continue
            if ts in wanted and wanted[ts] is None:
                if size is None:
                    size = (frame.width, frame.height)
                wanted[ts] = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
            done = done or ts >= last_pts
        if done:
            return


def decode_audio(
    path,
    *,
    sr: int = 16000,
    start_s: float | None = None,
    end_s: float | None = None,
    reject_silent: bool = False,
    silence_threshold: float = 1e-4,
    channel: int | None = None,
) -> np.ndarray:
    """Decode the first audio stream to float32 mono [N] in [-1, 1] at ``sr`` Hz.

    Resampling is FFmpeg's libswresample through ``av.AudioResampler`` (keeping the source
    channels); the mono mix is the mean of the channels (librosa's ``mono=True``), or the
    single ``channel`` given (OmniRetriever's loader keeps channel 0). The output
    is trimmed to the stream's declared duration (AAC's last-frame padding is dropped) and to
    ``[start_s, end_s)``. Output samples sit on the grid ``k / sr`` of the container clock
    (see :func:`_grid_start`), so a window decoded after a seek equals the same span of a
    full decode: sample-exact where the container's audio timestamps are (MP4, WAV), within
    the timestamp resolution elsewhere (Matroska: 1 ms).
    ``reject_silent`` raises ``MediaError('silent_audio')`` when the peak
    amplitude is below ``silence_threshold``.
    """
    if sr <= 0:
        raise ValueError(f"sr must be > 0, got {sr}")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise ValueError(f"end_s={end_s} must be > start_s={start_s}")
    container = _open(path)
    path = os.fspath(path)
    try:
        if not container.streams.audio:
            raise MediaError("no_audio_stream", path)
        stream = container.streams.audio[0]
        _check_decoder(path, stream)
        origin = _clock_origin(container)
        stream_end = _stream_duration_s(container, stream)
        seeked = start_s is not None and start_s > _AUDIO_SEEK_MARGIN_S and stream.time_base is not None
        if seeked:
            # Land well before start_s: a decoder restarted mid-stream (AAC's overlap-add)
            # spoils its first frame, and the resampler needs a few samples of history.
            seek_to = int((start_s - _AUDIO_SEEK_MARGIN_S + origin) / stream.time_base)
            try:
                container.seek(seek_to, stream=stream, backward=True, any_frame=False)
            except av.error.FFmpegError as e:
                raise MediaError("corrupt", path, f"seek failed: {e}") from e

        resampler = av.AudioResampler(format="fltp", rate=sr)
        chunks = []
        first_time = None
        skip = 0
        n_out = 0
        n_packets = 0
        stopped_early = False
        budget = (stream.frames or 0) + _UNINDEXED_PACKET_CAP
        try:
            for packet in container.demux(stream):
                budget -= 1
                if budget < 0:
                    raise MediaError("corrupt", path, "runaway decode loop")
                n_packets += packet.size > 0
                for frame in packet.decode():
                    if first_time is None:
                        start = (float(frame.time) if frame.time is not None else 0.0) - origin
                        first_time, skip = _grid_start(start, frame.sample_rate, sr)
                    if skip:
                        if skip >= frame.samples:
                            skip -= frame.samples
                            continue
                        frame, skip = _drop_leading(frame, skip), 0
                    for out in resampler.resample(frame):
                        chunks.append(out.to_ndarray())
                        n_out += out.samples
                if end_s is not None and first_time is not None and first_time + n_out / sr > end_s + 1.0:
                    stopped_early = True
                    break
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except av.error.FFmpegError as e:
            raise MediaError("corrupt", path, f"decode failed: {e}") from e
        if not stopped_early and not seeked and stream.frames and n_packets < stream.frames:
            raise MediaError("corrupt", path, f"truncated: {n_packets} of {stream.frames} audio packets present")
    finally:
        container.close()

    if not chunks or first_time is None:
        raise MediaError("corrupt", path, "audio stream decoded to no samples")
    planes = np.concatenate(chunks, axis=1).astype(np.float32)
    if channel is None:
        wave = planes.mean(axis=0)
    elif 0 <= channel < planes.shape[0]:
        wave = planes[channel]
    else:
        raise ValueError(f"channel={channel} out of range for {planes.shape[0]}-channel audio in {path}")
    stop_s = end_s if end_s is not None else stream_end
    if end_s is not None and stream_end is not None:
        stop_s = min(end_s, stream_end)
    lo = 0 if start_s is None else max(0, int(round((start_s - first_time) * sr)))
    hi = wave.shape[0] if stop_s is None else min(wave.shape[0], int(round((stop_s - first_time) * sr)))
    if hi <= lo:
        raise ValueError(f"no audio samples in [{start_s}, {end_s}) of {path}")
    wave = np.clip(wave[lo:hi], -1.0, 1.0)
    if reject_silent and float(np.max(np.abs(wave))) < silence_threshold:
        raise MediaError("silent_audio", path, f"peak amplitude below {silence_threshold}")
    return wave


def _grid_start(time_s: float, in_rate: int, out_rate: int) -> tuple[float, int]:
    """First input sample at or after ``time_s`` that lies on the output sample grid.

    The resampler's output sample k sits at its first input sample's time plus k / out_rate.
    Starting every decode at a whole number of output samples from the clock origin makes a
    seeked decode's samples coincide with those of a decode from the file start. Returns
    (that time, input samples to drop before it; 0 for streams starting at 0).
    """
    step = in_rate // math.gcd(in_rate, out_rate)
    index = round(time_s * in_rate)
    skip = (-index) % step
    return (index + skip) / in_rate, skip


def _drop_leading(frame: av.AudioFrame, count: int) -> av.AudioFrame:
    """A copy of ``frame`` without its first ``count`` samples (planar or packed)."""
    data = frame.to_ndarray()
    per_sample = 1 if frame.format.is_planar else frame.layout.nb_channels
    out = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(data[:, count * per_sample :]), format=frame.format.name, layout=frame.layout.name
    )
    out.sample_rate = frame.sample_rate
    if frame.pts is not None and frame.time_base is not None:
        out.time_base = frame.time_base
        out.pts = frame.pts + int(round(count / frame.sample_rate / frame.time_base))
    return out


def crop_or_pad(
    wave: np.ndarray,
    *,
    seconds: float = 8.0,
    sr: int = 16000,
    mode: str = "random",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Fix a waveform to ``round(sr * seconds)`` samples.

    Longer input is cropped: ``random`` (uniform offset from ``rng``, required), ``center`` or
    ``start`` (the reference's keep-the-first-seconds). Shorter input is zero-padded at the
    end, as the reference pads.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D [N], got shape {wave.shape}")
    target = int(round(sr * seconds))
    if target <= 0:
        raise ValueError(f"sr * seconds must be > 0, got sr={sr}, seconds={seconds}")
    if mode not in ("random", "center", "start"):
        raise ValueError(f"mode must be 'random', 'center' or 'start', got {mode!r}")
    n = wave.shape[0]
    if n >= target:
        spare = n - target
        if mode == "random":
            if rng is None:
                raise ValueError("mode='random' needs rng=np.random.Generator")
            offset = int(rng.integers(0, spare + 1))
        elif mode == "center":
            offset = spare // 2
        else:
            offset = 0
        return wave[offset : offset + target].copy()
    return np.concatenate([wave, np.zeros(target - n, dtype=wave.dtype)])


__all__ = ["MediaError", "MediaInfo", "REASONS", "probe", "decode_video", "decode_audio", "crop_or_pad"]
