"""Device mesh (data, fsdp, tensor) and the logical rules that place parameters and batches on it.

Parameters are placed by their HF name: projections into heads/MLP put their output rows on `tensor`
and their input columns on `fsdp`; projections back to the residual stream the other way round;
embeddings shard the vocabulary on `tensor`; norms and small vectors are replicated. A dimension is
sharded only when the axis size divides it, so one code path runs on 1 CPU, 4 host devices or 8 GPUs.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_surgery_jax.model.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# HF name suffix → logical placement of a [rows, columns] weight.
RULES = {
    ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"): ("tensor", "fsdp"),
    ("o_proj", "down_proj"): ("fsdp", "tensor"),
    ("embed_tokens", "lm_head"): ("tensor", "fsdp"),
    ("backbone_weight", "route_weight"): ("fsdp", None),
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh over all devices (of every process); data=-1 takes what fsdp × tensor leave."""
    devices = jax.devices() if devices is None else devices
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ConfigError(f"{len(devices)} devices cannot be split into fsdp={fsdp} × tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ConfigError(f"mesh data={data} × fsdp={fsdp} × tensor={tensor} != {len(devices)} devices")
    # Explicit device order (not jax.make_mesh) keeps one layout, and Auto sharding, on every JAX version.
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), AXES)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of the parameter `name` (dotted path) of this shape."""
    parts = name.split(".")
    placement: tuple = (None,) * len(shape)
    for suffixes, rule in RULES.items():
        if any(s in parts for s in suffixes) and len(shape) == len(rule):
            placement = rule
    return PartitionSpec(*(axis if axis and dim % mesh.shape[axis] == 0 else None
                           for axis, dim in zip(placement, shape, strict=True)))


def shard_state(state, mesh: Mesh):
    """NamedShardings for an nnx.State (or any pytree with named paths) of arrays."""

    def sharding(path, leaf):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return NamedSharding(mesh, spec_for(name, tuple(leaf.shape), mesh))

    return jax.tree_util.tree_map_with_path(sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] arrays: batch split over data × fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the batch axes of the mesh and over the processes."""
    shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    processes = jax.process_count()
    for count, what in ((shards, f"the mesh's data × fsdp = {shards} batch shards"),
                        (processes, f"{processes} processes")):
        if batch_size % count:
            raise ConfigError(f"batch_size={batch_size} does not split over {what}: use a multiple of {count}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_rows: np.ndarray, mesh: Mesh, global_rows: int) -> jax.Array:
    """One global [batch, seq] array from each process's own rows (multi-process runs)."""
    sharding = batch_sharding(mesh)
    return jax.make_array_from_process_local_data(sharding, local_rows, (global_rows, *local_rows.shape[1:]))


def put(tree, shardings):
    """Places host-identical values on (possibly multi-process) shardings; device_put where one process."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def place(value, target):
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)
