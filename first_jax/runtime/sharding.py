"""Mesh ("data", "fsdp", "tensor") and logical-axis rules -> NamedShardings for params and state.

Params carry logical axis names (see first_jax/models/llama.py); `DEFAULT_RULES` maps each onto
mesh axes. A mesh axis shards at most one dimension of a given array (the first that asks).

Indivisible dimensions: a dimension whose size is not a multiple of its mesh axes' product
(e.g. SmolLM2's 9 heads with tensor=2) is what `on_indivisible` says: "error" (what runs use,
the config's `mesh.on_indivisible` default) is a UserError naming the parameter path and axis;
"replicate" (these functions' default, for tools and tests) replicates that one dimension with
a warning naming the parameters, every other dimension keeping its sharding.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from first_jax.runtime.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

_log = logging.getLogger(__name__)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axis types (Explicit breaks lax.top_k)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, n in sizes.items():
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise UserError(f"mesh.{name}: must be a positive integer, got {n!r}")
  if data * fsdp * tensor != len(devices):
    raise UserError(f"mesh: data*fsdp*tensor must equal the {len(devices)} devices, got "
                    f"{data}*{fsdp}*{tensor}={data * fsdp * tensor}")
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES, path: str = "array",
                    on_indivisible: str = "replicate") -> tuple[P, list[str]]:
  """PartitionSpec for one array; also returns the indivisible-dimension notes (replicated)."""
  table: dict[str, Any] = {}
  for logical, axes in rules:
    table.setdefault(logical, axes)
  used: set[str] = set()
  spec, notes = [], []
  for dim, (name, size) in enumerate(zip(names, shape)):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise UserError(f"sharding rules: no rule for logical axis {name!r} (used by {path})")
    axes = table[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
      if a not in mesh.shape:
        raise UserError(f"sharding rules: {name!r} maps to {a!r}, not a mesh axis "
                        f"({', '.join(mesh.axis_names)})")
    axes = tuple(a for a in axes if a not in used)
    n = math.prod(mesh.shape[a] for a in axes)
    if size % n:
      note = (f"{path}: dimension {dim} ({name}, size {size}) is not divisible by mesh axes "
              f"{'*'.join(axes)}={n}")
      if on_indivisible == "error":
        raise UserError(note)
      notes.append(note)
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec), notes


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    on_indivisible: str = "replicate") -> Any:
  """NamedShardings (plain, unboxed tree structure) for logically partitioned (boxed) params.

  Leaves without logical names are replicated. See the module docstring for indivisible dims.
  """
  if on_indivisible not in ("replicate", "error"):
    raise ValueError(f"on_indivisible must be 'replicate' or 'error', got {on_indivisible!r}")
  notes: list[str] = []

  def one(path, leaf):
    if not _is_boxed(leaf):
      return NamedSharding(mesh, P())
    spec, leaf_notes = logical_to_spec(leaf.names, leaf.value.shape, mesh, rules,
                                       _path_str(path), on_indivisible)
    notes.extend(leaf_notes)
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(one, abstract_params, is_leaf=_is_boxed)
  if notes:
    _log.warning("replicating %d indivisible param dimension(s) instead of sharding them: %s",
                 len(notes), "; ".join(notes))
  return shardings


def unbox(tree: Any) -> Any:
  """Plain arrays out of logically partitioned boxes (no sharding constraint applied)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_boxed(x) else x, tree,
                      is_leaf=_is_boxed)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp, everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def put_global(tree: Any, sharding_: Any) -> Any:
  """Host arrays every process holds in full -> global arrays laid out as `sharding_` (a
  sharding or a matching tree of them): each process places only its own devices' slices, so
  this works on one process or many (where `jax.device_put` of a host value needs every device
  to be addressable)."""
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  if isinstance(sharding_, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, sharding_), tree)
  return jax.tree.map(one, tree, sharding_)


def process_rows(sharding_: jax.sharding.Sharding, num_rows: int) -> slice:
  """The rows of a [num_rows, ...] array laid out as `sharding_` (split on its leading axis)
  that this process's devices hold: one contiguous slice, also when processes share rows (a
  mesh axis the batch is replicated over, e.g. tensor, spanning processes)."""
  spans = {(i[0].start or 0, num_rows if i[0].stop is None else i[0].stop)
           for i in sharding_.addressable_devices_indices_map((num_rows,)).values()}
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(spans)} of {num_rows}: "
                     f"not one contiguous slice (order the mesh's devices by process)")
  return slice(lo, hi)


def put_process_rows(tree: Any, sharding_: jax.sharding.Sharding, num_rows: int) -> Any:
  """This process's rows (`process_rows`) of global [num_rows, ...] arrays -> the global arrays
  laid out as `sharding_`; each host passes only the rows it holds."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding_, np.ascontiguousarray(x), (num_rows,) + np.shape(x)[1:]), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def init_sharded(module: nn.Module, mesh: Mesh, rules: Rules, rng: jax.Array,
                 example_inputs: Sequence[Any], on_indivisible: str = "replicate") -> Any:
  """Plain params created directly in their shardings (no full copy on one device).

  `example_inputs` are arrays or ShapeDtypeStructs for `module.init`. The shardings are
  `jax.tree.map(lambda x: x.sharding, params)`.
  """
  inputs = [jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
            for x in example_inputs]
  init = lambda r: module.init(r, *inputs)["params"]
  shardings = param_shardings(jax.eval_shape(init, rng), mesh, rules, on_indivisible)
  return jax.jit(lambda r: unbox(init(r)), out_shardings=shardings)(rng)


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings_: Any,
                        mesh: Mesh) -> Any:
  """Shardings for `tx.init(params)`: param-shaped moments copy the param shardings
  (`optax.tree_map_params`), everything else (counts, scalars) is replicated.

  `params` may be arrays or ShapeDtypeStructs. Use as
  `jax.jit(tx.init, out_shardings=opt_state_shardings(...))(params)`.
  """
  abstract_state = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_shardings_,
                               transform_non_params=lambda _: replicated(mesh))
