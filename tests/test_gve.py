"""GVE (configs/common.gve on Qwen2.5-VL) against transformers + a torch pooling written from GVE's description.

Reference: a tiny random ``Qwen2_5_VLForConditionalGeneration`` (tests/hf_tiny.py), saved with
``save_pretrained`` and loaded through our converter. The torch side is built here from GVE's
published inference behaviour (VRAG ``search_engine/models/GVE`` and the mteb wrapper, as summarised
in configs/common.gve), not from our layout code:
- a conversation per item, ``[system?] + user[content]``, rendered as Qwen2.5-VL's chat template does
  (``render``: the default system turn when there is none, image / video blocks as
  ``<|vision_start|><|image_pad|>/<|video_pad|><|vision_end|>``, the generation prompt), each pad
  expanded to ``prod(grid_thw) / merge**2`` placeholders as the processor does, then the
  ``<|endoftext|>`` id appended (VRAG's processor);
- content order: text ``[text]``, image ``[image]``, video ``[video]``, text+image ``[image, text]``,
  text+video ``[video, text]``; documents video ``[video]`` and text ``[text]``;
- rows left-padded (mteb's ``padding_side='left'``), ``mm_token_type_ids`` as the processor writes them,
  ``last_pool`` (``h[:, -1]`` when every row ends in a real token, else ``h[b, len - 1]``) of
  ``hidden_states[-1]``, then ``F.normalize``.
Checked: max abs error <= 1e-5 in float32 (matmul precision HIGHEST) and cosine >= 0.9999 with bfloat16
compute, for every kind, with the default instruction and with one of its own in the system turn;
bad input (an image where a video is expected, a composed query without its text, too many frames)
is refused on the host naming the config key.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from configs import common, tiny
from omniret_jax import build
from omniret_jax.config import Precision
from omniret_jax.convert.to_flax import load_backbone
from omniret_jax.data.batch import prepare, still_frames
from omniret_jax.data.tokens import ENDOFTEXT, IM_START as IM_START_TEXT, Tokens
from omniret_jax.model import embedder as E
from tests.hf_tiny import IM_END, IM_START, IMAGE_ID, VIDEO_ID, VISION_BOS, VISION_EOS, tiny_hf_vl
from tests.parity import PATCH

ROOT = Path(__file__).resolve().parents[1]
EOT = 299                                      # <|endoftext|> in the tiny vocabulary
TOL, BF16_COS = 1e-5, 0.9999
MERGE = 2


def encode(s: str) -> list[int]:
    """Byte stand-in tokenizer inside the tiny vocabulary (ids 1..250)."""
    return [b % 250 + 1 for b in s.encode()]


TOKENS = Tokens(encode=encode, im_end_id=IM_END, pad_id=0, special=((IM_START_TEXT, IM_START), (ENDOFTEXT, EOT)))
embed = nnx.jit(E.embed_paths, static_argnames=("ecfg",))

# Query and document kinds -> (our path, the user turn's content types in order).
KINDS = {"text": ("T", ["text"]), "image": ("I", ["image"]), "video": ("V", ["video"]),
         "text+image": ("TI", ["image", "text"]), "text+video": ("TV", ["video", "text"])}
PATHS = tuple(p for p, _ in KINDS.values())


def gve_ecfg(instruction: str | None = None):
    kw = {} if instruction is None else {"instruction": instruction}
    return build.embed_config(common.gve(tiny.get_config("pairwise"), **kw))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf = tiny_hf_vl(seed=21)
    path = tmp_path_factory.mktemp("gve") / "qwen_vl"
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def models(saved):
    hf, path = saved
    return hf, load_backbone(path, progress=False)[0]


def make_batch(rng):
    """Three items: captions, a video each (grids of different shapes, second_per_grid != 1) and an image each."""
    vgrids = np.array([[2, 4, 6], [4, 4, 4], [1, 6, 4]])
    igrids = np.array([[1, 4, 4], [1, 6, 8], [1, 2, 4]])
    captions = ["a red circle moving left", "blue square", "the same shape, moving up, slowly"]
    spg = np.array([1.0, 2.5, 0.5], np.float32)

    def patches(grids):
        n = grids.prod(axis=1)
        x = np.zeros((len(grids), n.max(), PATCH), np.float32)
        for i, k in enumerate(n):
            x[i, :k] = rng.standard_normal((k, PATCH))
        return x

    return dict(caption=captions, video_patches=patches(vgrids), video_grid_thw=vgrids, video_second_per_grid=spg,
                image_patches=patches(igrids), image_grid_thw=igrids)


# ----------------------------------------------------------------------------- the torch reference

SPECIAL = {"<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|vision_start|>": VISION_BOS,
           "<|vision_end|>": VISION_EOS, "<|image_pad|>": IMAGE_ID, "<|video_pad|>": VIDEO_ID}


def render(messages: list[dict]) -> str:
    """Qwen2.5-VL's chat template with add_generation_prompt=True."""
    out = "" if messages[0]["role"] == "system" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n"
        if isinstance(m["content"], str):
            out += m["content"]
        for item in [] if isinstance(m["content"], str) else m["content"]:
            if item["type"] == "image":
                out += "<|vision_start|><|image_pad|><|vision_end|>"
            elif item["type"] == "video":
                out += "<|vision_start|><|video_pad|><|vision_end|>"
            else:
                out += item["text"]
        out += "<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def tokenize(text: str, image_grids: list, video_grids: list) -> list[int]:
    """Special tokens as ids, the rest through ``encode``; each pad expanded to its grid's tokens (the
    processor), then GVE's ``<|endoftext|>`` appended."""
    ids, grids = [], {IMAGE_ID: iter(image_grids), VIDEO_ID: iter(video_grids)}
    for part in re.split("(" + "|".join(map(re.escape, SPECIAL)) + ")", text):
        if part in SPECIAL:
            tok = SPECIAL[part]
            ids += [tok] * (int(np.prod(next(grids[tok]))) // MERGE**2 if tok in grids else 1)
        elif part:
            ids += encode(part)
    return ids + [EOT]


@torch.no_grad()
def reference(hf, kind: str, batch: dict, instruction: str | None, dtype=torch.float32) -> np.ndarray:
    """GVE embeddings of every item of ``batch`` as ``kind``, one left-padded batch."""
    content_types = KINDS[kind][1]
    rows, images, videos = [], [], []
    for i in range(len(batch["caption"])):
        content = []
        for t in content_types:
            content.append({"type": "text", "text": batch["caption"][i]} if t == "text" else {"type": t})
        messages = ([{"role": "system", "content": instruction}] if instruction else []) + [
            {"role": "user", "content": content}]
        ig = [batch["image_grid_thw"][i]] if "image" in content_types else []
        vg = [batch["video_grid_thw"][i]] if "video" in content_types else []
        rows.append(tokenize(render(messages), ig, vg))
        if ig:
            images.append(batch["image_patches"][i, :int(np.prod(ig[0]))])
        if vg:
            videos.append(batch["video_patches"][i, :int(np.prod(vg[0]))])
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    kw = dict(input_ids=ids, attention_mask=mask,
              mm_token_type_ids=torch.where(ids == IMAGE_ID, 1, torch.where(ids == VIDEO_ID, 2, 0)))
    if images:
        kw.update(pixel_values=torch.tensor(np.concatenate(images), dtype=dtype),
                  image_grid_thw=torch.tensor(batch["image_grid_thw"]))
    if videos:
        kw.update(pixel_values_videos=torch.tensor(np.concatenate(videos), dtype=dtype),
                  video_grid_thw=torch.tensor(batch["video_grid_thw"]),
                  second_per_grid_ts=torch.tensor(batch["video_second_per_grid"], dtype=torch.float32))
    h = hf(**kw, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    if bool(mask[:, -1].all()):
        pooled = h[:, -1]
    else:
        pooled = h[torch.arange(len(rows)), mask.sum(1) - 1]
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1).numpy()


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("instruction", [None, "Retrieve the video that matches the query."])
def test_every_kind_matches_the_reference_float32(models, instruction):
    hf, model = models
    ecfg = gve_ecfg(instruction)
    batch = make_batch(np.random.default_rng(0))
    inputs = prepare(batch, PATHS, model.cfg, TOKENS, ecfg)
    ours = {p: np.asarray(v) for p, v in embed(model, inputs, ecfg).items()}
    errors = {kind: float(np.abs(ours[path] - reference(hf, kind, batch, instruction)).max())
              for kind, (path, _) in KINDS.items()}
    print(f"\nGVE vs torch (float32, instruction {instruction!r}): max abs error {errors}")
    assert max(errors.values()) <= TOL, errors


def test_every_kind_matches_the_reference_bfloat16(saved):
    hf, path = saved
    model = load_backbone(path, precision=Precision.from_names(compute="bfloat16"), progress=False)[0]
    ecfg = gve_ecfg()
    batch = make_batch(np.random.default_rng(1))
    inputs = prepare(batch, PATHS, model.cfg, TOKENS, ecfg)
    ours = {p: np.asarray(v) for p, v in embed(model, inputs, ecfg).items()}
    cos = {kind: float((ours[path] * reference(hf, kind, batch, None)).sum(-1).min())
           for kind, (path, _) in KINDS.items()}
    print(f"\nGVE bfloat16 compute vs torch float32: min cosine {cos}")
    assert min(cos.values()) >= BF16_COS, cos


def test_still_frame_is_the_first_frame_as_an_image(models):
    """An image query made from a clip: the first temporal grid's patches with its first frame repeated
    over the temporal patch (what the image processor makes of one frame), grid (1, h, w)."""
    hf, model = models
    batch = make_batch(np.random.default_rng(2))
    del batch["image_patches"], batch["image_grid_thw"]
    b = still_frames(batch, model.cfg.vision)
    np.testing.assert_array_equal(b["image_grid_thw"], [[1, 4, 6], [1, 4, 4], [1, 6, 4]])
    first = batch["video_patches"][0, :24].reshape(24, 3, 2, -1)
    got = b["image_patches"][0, :24].reshape(24, 3, 2, -1)
    np.testing.assert_array_equal(got[:, :, 0], first[:, :, 0])
    np.testing.assert_array_equal(got[:, :, 1], first[:, :, 0])
    assert not b["image_patches"][1, 16:].any()
    ecfg = gve_ecfg()
    ours = np.asarray(embed(model, prepare(b, ("I",), model.cfg, TOKENS, ecfg), ecfg)["I"])
    err = float(np.abs(ours - reference(hf, "image", b, None)).max())
    assert err <= TOL, err


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_before_jit(models):
    _, model = models
    ecfg = gve_ecfg()
    batch = make_batch(np.random.default_rng(3))
    image_only = {k: v for k, v in batch.items() if not k.startswith("video")}
    with pytest.raises(ValueError, match=r"take a video, but the batch holds an image"):
        prepare(image_only, ("V",), model.cfg, TOKENS, ecfg)
    with pytest.raises(KeyError, match=r"composed query \(TI: image \+ text\) needs its text"):
        prepare({k: v for k, v in batch.items() if k != "caption"}, ("TI",), model.cfg, TOKENS, ecfg)
    with pytest.raises(ValueError, match=r"composed query \(TI: image \+ text\) needs its text.*empty caption"):
        prepare(dict(batch, caption=["a", "", "b"]), ("TI",), model.cfg, TOKENS, ecfg)
    ten = dict(batch, video_grid_thw=np.array([[5, 4, 6], [4, 4, 4], [1, 6, 4]]),
               video_patches=np.zeros((3, 120, PATCH), np.float32))
    with pytest.raises(ValueError, match=r"10 frames .* above config\.embed\.max_frames=8"):
        prepare(ten, ("V",), model.cfg, TOKENS, ecfg)
    video_only = build.embed_config(build.load_config(f"{ROOT}/configs/gve_tiny.py",
                                                      {"embed.media_kinds": ("video",)}))
    with pytest.raises(ValueError, match=r"is Image .* accepts only video \(config\.embed\.media_kinds"):
        prepare(batch, ("I",), model.cfg, TOKENS, video_only)
