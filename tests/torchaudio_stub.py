"""Import PyPI `openbeats` (ESPnet's BeatsEncoder) without torchaudio.

`openbeats.beats_encoder` imports `torchaudio.compliance.kaldi` at module top
only for its waveform front end (`kaldi.fbank`). No torchaudio wheel matches
torch 2.13 CPU here, and the parity tests feed the normalised fbank directly,
so that symbol is never needed. `import_beats_encoder` puts a stand-in
`torchaudio.compliance.kaldi` into `sys.modules` for the duration of that one
import and removes it afterwards, so no other test sees a fake torchaudio. The
stand-in's `fbank` raises, so a test that reached the waveform path would fail
loudly instead of computing something wrong.
"""

from __future__ import annotations

import importlib
import sys
import types

_STUB_NAMES = ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi")


def _fbank_unavailable(*args, **kwargs):
    raise RuntimeError("torchaudio stub: kaldi.fbank is not available; feed the fbank directly")


def import_beats_encoder() -> types.ModuleType:
    """Return `openbeats.beats_encoder`, importing it behind a temporary torchaudio stand-in."""
    if "openbeats.beats_encoder" in sys.modules:
        return sys.modules["openbeats.beats_encoder"]
    try:
        importlib.import_module("torchaudio.compliance.kaldi")
        real = True
    except (ImportError, OSError):  # absent, or a wheel built for another torch
        real = False
    if real:
        return importlib.import_module("openbeats.beats_encoder")
    # openbeats also imports two transformers modules; import them first so that
    # transformers' own torchaudio probe runs before the stand-in exists.
    importlib.import_module("transformers.models.bart.modeling_bart")
    importlib.import_module("transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer")
    pkg = types.ModuleType("torchaudio")
    compliance = types.ModuleType("torchaudio.compliance")
    kaldi = types.ModuleType("torchaudio.compliance.kaldi")
    kaldi.fbank = _fbank_unavailable
    pkg.compliance, compliance.kaldi = compliance, kaldi
    sys.modules.update(zip(_STUB_NAMES, (pkg, compliance, kaldi)))
    try:
        return importlib.import_module("openbeats.beats_encoder")
    finally:
        for name in _STUB_NAMES:
            sys.modules.pop(name, None)
