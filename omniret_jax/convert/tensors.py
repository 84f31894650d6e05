"""Safetensors files tensor by tensor: the one header reader, the streaming writer, checkpoint sources.

Safetensors files are parsed directly (8-byte header length, JSON header, raw
little-endian data) so each tensor is read with one ``np.fromfile`` into its own
buffer: memory stays bounded by the largest tensor, and bfloat16 works without
torch (``ml_dtypes``, a JAX dependency, provides the NumPy dtype). A sharded
checkpoint is found through ``model.safetensors.index.json``. PyTorch ``.bin``
pickles are refused unless explicitly allowed, then loaded with
``torch.load(weights_only=True)``. Writing goes the other way one tensor at a time
(``write_safetensors``), so an export never holds the whole model on the host.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or key."""


SAFETENSORS_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """(tensor entries, ``__metadata__``, byte offset of the data section) of a safetensors file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(100_000_000, os.path.getsize(path) - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from e
    meta = header.pop("__metadata__", None) or {}
    return header, meta, 8 + n


def write_safetensors(path: str | Path, entries: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
    """Write one safetensors file from (key, shape, dtype) entries, fetching each tensor when its turn comes.

    ``fetch(key)`` must return an array of exactly the announced shape and dtype.
    Returns the number of data bytes written.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; writing from a big-endian host is not supported")
    entries = list(entries)
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key, shape, dtype in entries:
        dtype = np.dtype(dtype)
        if dtype not in SAFETENSORS_CODES:
            raise ValueError(f"tensor {key!r}: dtype {dtype} has no safetensors code")
        if key in header:
            raise ValueError(f"tensor {key!r} is written twice")
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_CODES[dtype], "shape": [int(s) for s in shape],
                       "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape, dtype in entries:
            arr = np.ascontiguousarray(fetch(key))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {key!r}: fetched {arr.shape} {arr.dtype}, announced {tuple(shape)} {dtype}")
            arr.tofile(f)
    return offset


class TensorSource:
    """Key -> tensor access over a checkpoint directory or file, streaming."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        path = Path(path)
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        self._pickles: list[Path] = []
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            single = path / "model.safetensors"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({path / f for f in weight_map.values()})
            elif single.is_file():
                files = [single]
            else:
                files = sorted(path.glob("*.safetensors"))
            if not files:
                bins = sorted(path.glob("*.bin"))
                if bins and not allow_pickle:
                    raise CheckpointError(
                        f"{path} holds only PyTorch pickles ({bins[0].name}, ...); pickles can run code on load. "
                        "Convert them to safetensors, or pass allow_pickle=True to load them with "
                        "torch.load(weights_only=True).")
                if not bins:
                    raise CheckpointError(f"{path}: no *.safetensors (or *.bin) checkpoint files found")
                self._pickles = bins
        elif path.suffix == ".safetensors":
            files = [path]
        elif path.suffix in (".bin", ".pt", ".pth"):
            if not allow_pickle:
                raise CheckpointError(f"{path} is a PyTorch pickle; pass allow_pickle=True to load it with "
                                      "torch.load(weights_only=True)")
            files, self._pickles = [], [path]
        else:
            raise CheckpointError(f"{path}: not a directory, .safetensors or .bin file")
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"checkpoint shard {f} listed in the index is missing")
            header, _, data_start = read_header(f)
            for key, info in header.items():
                if key in self._entries:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._entries[key][0]} and {f}")
                self._entries[key] = (f, info, data_start)
        # Pickles cannot be read partially: each is loaded whole, once.
        self._pickle_tensors: dict[str, np.ndarray] = {}
        for f in self._pickles:
            self._pickle_tensors.update(self._load_pickle(f))

    @staticmethod
    def _load_pickle(path: Path) -> dict[str, np.ndarray]:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is a test dependency
            raise CheckpointError(f"loading {path} needs torch (pip install torch)") from e
        sd = torch.load(path, map_location="cpu", weights_only=True)
        out = {}
        for k, v in sd.items():
            if v.dtype == torch.bfloat16:
                out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[k] = v.numpy()
        return out

    def keys(self) -> list[str]:
        return sorted([*self._entries, *self._pickle_tensors])

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._entries:
            return tuple(self._entries[key][1]["shape"])
        return tuple(self.read(key).shape)

    def read(self, key: str) -> np.ndarray:
        if key in self._pickle_tensors:
            return self._pickle_tensors[key]
        try:
            f, info, data_start = self._entries[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint") from None
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{f}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if (end - start) != count * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{f}: tensor {key!r} byte range does not match shape {shape} {info['dtype']}")
        arr = np.fromfile(f, dtype=dtype, count=count, offset=data_start + start)
        if arr.size != count:
            raise CheckpointError(f"{f}: truncated while reading {key!r}")
        return arr.reshape(shape)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.keys():
            yield key, self.read(key)


class MappingSource:
    """In-memory tensors (a state dict already read) behind the TensorSource interface."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._tensors = {k: np.asarray(v) for k, v in tensors.items()}

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.read(key).shape)

    def read(self, key: str) -> np.ndarray:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint") from None


class OverlaySource:
    """A TensorSource with some keys replaced: ``hidden`` prefixes dropped, ``extra`` tensors added.

    Used where a sub-model's checkpoint needs rewriting before the generic loader
    (BEATs' tied tables and weight norm) or where tensors come from elsewhere
    (a separate BEATs file, freshly initialised heads).
    """

    def __init__(self, base: TensorSource, extra: dict[str, np.ndarray], hidden: tuple[str, ...] = ()):
        self._base, self._extra, self._hidden = base, extra, tuple(hidden)

    def keys(self) -> list[str]:
        kept = [k for k in self._base.keys() if not k.startswith(self._hidden) and k not in self._extra]
        return sorted([*kept, *self._extra])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._extra[key].shape) if key in self._extra else self._base.shape(key)

    def read(self, key: str) -> np.ndarray:
        return self._extra[key] if key in self._extra else self._base.read(key)
