"""What the token layout needs from a tokenizer, and the byte tokenizer of the random-init tiny models."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Tokens:
    """What the layout needs from a tokenizer."""
    encode: Callable[[str], list[int]]
    im_end_id: int
    pad_id: int

    @classmethod
    def from_pretrained(cls, path) -> "Tokens":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if im_end is None or im_end == tok.unk_token_id:
            raise ValueError(f"tokenizer at {path} has no <|im_end|> token")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        return cls(encode=lambda s: tok(s, add_special_tokens=False)["input_ids"], im_end_id=im_end, pad_id=pad)


# Special token ids of the random-init tiny model (its vocabulary is bytes + these).
TINY_IDS = dict(audio_token_id=300, image_token_id=301, video_token_id=302, audio_start_token_id=303,
                audio_end_token_id=304, vision_start_token_id=305, vision_end_token_id=306)
TINY_IM_END, TINY_PAD = 307, 0


def byte_tokens() -> Tokens:
    """Tokenizer of the tiny model: UTF-8 bytes shifted by one (0 is padding)."""
    return Tokens(encode=lambda s: [b + 1 for b in s.encode()], im_end_id=TINY_IM_END, pad_id=TINY_PAD)
