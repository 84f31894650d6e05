"""What the token layout needs from a tokenizer, and the byte tokenizer of the random-init tiny models."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

# Chat-template special tokens that template strings (EmbedConfig.turn_start / turn_end) may hold;
# ENDOFTEXT is the token GVE's processor appends after the generation prompt and pools.
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class Tokens:
    """What the layout needs from a tokenizer.

    ``special``: (literal, id) pairs that ``encode_text`` keeps as one token each; ``<|im_end|>``
    is always one of them (``im_end_id``).
    """
    encode: Callable[[str], list[int]]
    im_end_id: int
    pad_id: int
    special: tuple[tuple[str, int], ...] = ()

    def encode_text(self, s: str) -> list[int]:
        """Token ids of a config string (template piece, prefix, prompt) with its special tokens
        as single ids: what a Hugging Face tokenizer does with added tokens, for any ``encode``."""
        special = dict(self.special)
        special[IM_END] = self.im_end_id
        ids: list[int] = []
        for part in re.split("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")", s):
            if part in special:
                ids.append(special[part])
            elif part:
                ids += list(self.encode(part))
        return ids

    @classmethod
    def from_pretrained(cls, path) -> "Tokens":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        im_end = tok.convert_tokens_to_ids(IM_END)
        if im_end is None or im_end == tok.unk_token_id:
            raise ValueError(f"tokenizer at {path} has no {IM_END} token")
        found = {t: tok.convert_tokens_to_ids(t) for t in (IM_START, ENDOFTEXT)}
        special = tuple((t, i) for t, i in found.items() if i is not None and i != tok.unk_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        return cls(encode=lambda s: tok(s, add_special_tokens=False)["input_ids"], im_end_id=im_end, pad_id=pad,
                   special=special)


# Special token ids of the random-init tiny model (its vocabulary is bytes + these).
TINY_IDS = dict(audio_token_id=300, image_token_id=301, video_token_id=302, audio_start_token_id=303,
                audio_end_token_id=304, vision_start_token_id=305, vision_end_token_id=306)
TINY_IM_END, TINY_PAD, TINY_IM_START, TINY_ENDOFTEXT = 307, 0, 308, 309


def byte_tokens(im_end_id: int = TINY_IM_END, pad_id: int = TINY_PAD, im_start_id: int = TINY_IM_START,
                endoftext_id: int = TINY_ENDOFTEXT) -> Tokens:
    """UTF-8 bytes shifted by one (0 is padding) under the given special ids: the tiny models'
    tokenizer (default ids) and the tokenizer stand-in of random-init real shapes."""
    return Tokens(encode=lambda s: [b + 1 for b in s.encode()], im_end_id=im_end_id, pad_id=pad_id,
                  special=((IM_START, im_start_id), (ENDOFTEXT, endoftext_id)))
