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
is refused on the host naming the config key. Configs: gve_7b / gve_3b have the released shapes and
LoRA on q/k/v/o only; gve_tiny's train-step and eval inputs on a synthetic corpus (fast, no jit), and
(slow, ~2 min on CPU) its CLI trains a few steps and scores T->V, V->T, I->V and TI->V.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from omniret_jax import build
from omniret_jax.config import Precision
from omniret_jax.convert.to_flax import load_backbone
from omniret_jax.data.batch import prepare, still_frames
from omniret_jax.data.tokens import ENDOFTEXT, TINY_ENDOFTEXT, Tokens
from omniret_jax.data.tokens import IM_START as IM_START_TEXT
from omniret_jax.inputs import IMAGE, VIDEO
from omniret_jax.model import embedder as E
from tests.hf_tiny import IM_END, IM_START, IMAGE_ID, VIDEO_ID, VISION_BOS, VISION_EOS, saved_tiny_vl
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
    """configs/gve_tiny.py's embedding settings; its config argument is the instruction."""
    spec = f"{ROOT}/configs/gve_tiny.py" + (f":{instruction}" if instruction else "")
    return build.embed_config(build.load_config(spec))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_tiny_vl(tmp_path_factory.mktemp("gve"), seed=21)


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
    with pytest.raises(ValueError, match=r"config\.data\.num_frames=16 is above config\.embed\.max_frames=8"):
        build.check_backbone(build.load_config(f"{ROOT}/configs/gve_tiny.py", {"data.num_frames": 16}))
    with pytest.raises(ValueError, match=r"EmbedConfig\.max_frames must be a positive int"):
        build.embed_config(build.load_config(f"{ROOT}/configs/gve_tiny.py", {"embed.max_frames": 0}))


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("size, shape", [("7b", (3584, 28, 28, 4, 18944, 152064, False)),
                                         ("3b", (2048, 36, 16, 2, 11008, 151936, True))])
def test_released_shapes_and_lora_on_the_llm_only(size, shape):
    c = build.load_config(f"{ROOT}/configs/gve_{size}.py", {"model.init": "random"})
    assert (c.model.backbone, c.data.num_frames, c.data.max_pixels, c.loss.preset) == ("gve", 8, 200 * 28 * 28,
                                                                                      "pairwise")
    lcfg, ecfg = build.loss_config(c), build.embed_config(c)
    assert lcfg.pair_list == (("T", "V"),) and ecfg.max_frames == 8 and ecfg.pooling == "last"
    assert ecfg.turn_end.endswith("<|im_start|>assistant\n<|endoftext|>")
    _, trainable, _, cfg = build.abstract_state(c)
    t = cfg.text
    assert cfg.family == "qwen2_5_vl" and cfg.vision.out_hidden_size == t.hidden_size
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            t.vocab_size, t.tie_word_embeddings) == shape
    # The config scans its decoder layers: each adapter leaf is stacked over the layers.
    assert c.model.scan_layers
    leaves = {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(trainable)}
    assert len(leaves) == 2 * 4 and all(shape[0] == t.num_hidden_layers for shape in leaves.values())
    assert all(re.fullmatch(r"language_model\.layers\.module\.self_attn\.[qkvo]_proj\.lora_[ab]", p) for p in leaves)


def _tiny(**extra):
    """configs/gve_tiny.py at a few steps on a small corpus."""
    return build.load_config(f"{ROOT}/configs/gve_tiny.py", {
        "train.steps": 2, "train.batch_size": 8, "train.log_every": 1, "train.ckpt_every": 2, "data.synth_n": 8,
        **extra})


def _check_results(res, steps=2):
    assert list(res["directions"]) == ["T->V", "V->T", "I->V", "TI->V"] and res["step"] == steps
    assert res["gallery"] == 8 and res["dim"] == 64
    assert all(0 <= d["R@1"] <= 100 and d["queries"] == 8 for d in res["directions"].values())


def test_tiny_host_side_of_train_and_eval(tmp_path):
    """Fast (no jit): a synthetic corpus through the pipeline into gve_tiny's train-step inputs (T and V
    only, no audio) and into the eval's I / TI inputs (still frames, the composed query's text)."""
    from omniret_jax.data.batch import build_inputs
    from omniret_jax.data.pipeline import DataPipeline
    from omniret_jax.data.synth import SynthSettings, generate
    from omniret_jax.eval.embed import composed_records, eval_pipeline_config, paths_for
    from omniret_jax.losses import needed_views
    from omniret_jax.train import pipeline_config

    c = _tiny()
    records = generate(str(tmp_path / "corpus"), 4, settings=SynthSettings(seconds=1.0, size=64), progress=False)
    cfg, _ = build._random_configs(c)
    tokens, ecfg = build.tokens_for(c), build.embed_config(c)
    plan = needed_views(build.loss_config(c))
    assert plan.anchor == ("T", "V") and not plan.aug and not plan.negative
    pcfg = dataclasses.replace(pipeline_config(c, augment=False, caption_tokens=ecfg.text_len - 1), batch_size=4)
    with DataPipeline(records, pcfg, tokens=tokens, process_index=0, process_count=1) as pipe:
        batch = next(pipe)
    inputs = build_inputs(batch, 0, cfg, tokens, ecfg, plan, seed=0)
    assert set(inputs.anchor.paths) == {"T", "V"} and inputs.anchor.mel is None
    ids = inputs.anchor.paths["V"].input_ids[0]
    pooled = inputs.anchor.paths["V"].pool_index[0]
    assert ids.reshape(-1)[pooled] == TINY_ENDOFTEXT and cfg.video_token_id in ids

    assert paths_for(c.eval.directions) == ("T", "V", "I", "TI")
    texts = [r.caption for r in composed_records(records)]
    assert texts == [f"the same shape, moving {r.meta['motion']}" for r in records]
    epcfg = dataclasses.replace(eval_pipeline_config(c), batch_size=4, caption_tokens=ecfg.text_len - 1)
    with DataPipeline(composed_records(records), epcfg, tokens=tokens, process_index=0, process_count=1) as pipe:
        batch = next(pipe)
    ti = prepare(still_frames(batch, cfg.vision), ("TI",), cfg, tokens, ecfg).paths["TI"]
    assert (ti.source == IMAGE).any() and not (ti.source == VIDEO).any()


def test_composed_query_needs_its_text(tmp_path):
    from omniret_jax.data.manifest import ManifestRecord
    from omniret_jax.eval.embed import composed_records

    r = ManifestRecord(id="x", caption="a red circle", video="/x.mp4", meta={"shape": "circle"})
    with pytest.raises(ValueError, match=r"record 'x' has no meta\['composed_query'\].*TI->V"):
        composed_records([r])


@pytest.mark.slow
def test_cli_trains_and_evaluates(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", *map(str, a)], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=900)
    work = tmp_path / "run"
    r = run("omniret_jax.train", "--config", "configs/gve_tiny.py", "--workdir", work, "--config.train.steps=2",
            "--config.data.synth_n=8", "--config.train.batch_size=4", "--config.train.log_every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and np.isfinite(logged[-1]["loss"])
    assert "L_A/T-V" in logged[-1] and "L_A/T-A" not in logged[-1]  # InfoNCE text <-> video only
    r = run("omniret_jax.eval", "--config", "configs/gve_tiny.py", "--checkpoint", work, "--manifest",
            work / "corpus" / "manifest.jsonl", "--out", tmp_path / "eval", "--batch_size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    _check_results(json.loads((tmp_path / "eval" / "results.json").read_text()))
    print(r.stdout)
