"""One process of tests/test_multihost.py's quick two-process check (not a test module).

    python tests/multihost_worker.py PORT PROCESS_ID OUT_DIR MANIFEST

Starts jax.distributed on 127.0.0.1:PORT (2 processes, CPU collectives, the device count from
XLA_FLAGS), then writes OUT_DIR/p<PROCESS_ID>.npz with what this process computes for the tiny
config on a data=8 mesh: its batch rows, its pipeline rows of 3 global batches, the host inputs
of those micro-batches built with the row metadata exchanged through jax.distributed's key-value
store (the trainer's RowExchange; hard negatives of every slot), and
device results that need the other process's rows (a cross-process row gather, a replicated
placement). ``reference(manifest)`` computes the same in one process for the comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCHES = 3
BATCH = 8


def _config(manifest: str):
    from omniret_jax import build

    c = build.load_config(f"{REPO / 'configs' / 'tiny.py'}:full", {"train.batch_size": BATCH})
    c.data.manifest = manifest
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
    return c


def _flatten(prefix: str, tree, out: dict) -> None:
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + jax.tree_util.keystr(path, simple=True, separator=".")] = np.asarray(leaf)


def compute(manifest: str, *, gather_for=None) -> dict[str, np.ndarray]:
    """This process's share (every row when alone) of the pipeline and host-input arrays, plus
    device results read back from this process's shards. ``gather_for(k)``: the row exchange of
    micro-batch k (the trainer's ``RowExchange.gather``)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from omniret_jax import build, sharding
    from omniret_jax.data.batch import build_inputs, caption_token_budget, cut_patches
    from omniret_jax.data.pipeline import DataPipeline
    from omniret_jax.losses import needed_views
    from omniret_jax.train import pipeline_config

    c = _config(manifest)
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    rows = sharding.process_rows(mesh, BATCH)
    tokens, ecfg, plan = build.tokens_for(c), build.embed_config(c), needed_views(build.loss_config(c))
    model_cfg = build.abstract_state(c)[3]
    pcfg = pipeline_config(c, augment=True)
    budget = caption_token_budget(ecfg)
    out = {"rows": np.asarray(rows)}
    with DataPipeline(manifest, pipeline_config(c, augment=True, caption_tokens=budget), tokens=tokens,
                      rows=rows) as pipe:
        for k in range(BATCHES):
            # The trainer's order: every process cuts the patches to the bucket of the global batch.
            batch = cut_patches(next(pipe), pcfg.patch_bucket_sizes,
                                gather=None if gather_for is None else gather_for(k, None, "patches"))
            out[f"b{k}.ids"] = np.asarray(batch["id"])
            for key in ("caption_ids", "video_patches", "video_grid_thw", "mel", "fbank"):
                out[f"b{k}.{key}"] = batch[key]
            out[f"b{k}.aug.video_patches"] = batch["aug"]["video_patches"]
            host = build_inputs(batch, k, model_cfg, tokens, ecfg, plan, seed=c.train.seed, counter=k,
                                gather=None if gather_for is None else gather_for(k), row_offset=rows[0])
            _flatten(f"b{k}.neg.", host.neg, out)
            out[f"b{k}.neg_rows"] = host.neg_rows
            _flatten(f"b{k}.TVA.", host.anchor.paths["TVA"], out)
            # the device side of a hard negative: rows of a global, batch-sharded array picked by
            # global row index (some live on the other process)
            inputs = sharding.shard_batch({"x": batch["mel"][:, 0, :4], "rows": host.neg_rows}, mesh)
            taken = jax.jit(lambda x, r: jnp.take(x, r[:, 2], axis=0),
                            out_shardings=sharding.batch_sharding(mesh, BATCH))(inputs["x"], inputs["rows"])
            out[f"b{k}.taken"] = np.concatenate([np.asarray(s.data) for s in sorted(
                taken.addressable_shards, key=lambda s: s.index[0].start or 0)])
    # placement of a replicated and a sharded host value, and a reduction over both
    host_w = np.arange(16, dtype=np.float32).reshape(8, 2)
    w = sharding.put({"a": host_w, "b": host_w}, {"a": NamedSharding(mesh, PartitionSpec()),
                                                   "b": NamedSharding(mesh, PartitionSpec("data"))})
    total = jax.jit(lambda t, s: (t["a"] * t["b"]).sum() + s)(w, sharding.replicated(np.float32(1.0), mesh))
    out["reduced"] = np.asarray(total.addressable_data(0))
    return out


def main(argv) -> None:
    port, process_id, out_dir, manifest = argv[1:5]
    from omniret_jax import sharding
    from omniret_jax.train import RowExchange

    sharding.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
    result = compute(manifest, gather_for=RowExchange(lag=BATCHES).gather)
    np.savez(Path(out_dir) / f"p{process_id}.npz", **result)
    print(f"process {process_id}: rows {result['rows'].tolist()}, wrote {len(result)} arrays")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv)
