"""Will it fit? The compiled memory plan of a config's programs, before launch, without weights.

    python -m first_jax.plan --config configs/qwen1_5_7b_to_1_8b.py [--devices N] \
        [--config.mesh.fsdp=8 ...]

Builds every program a run compiles — the teacher's fine-tuning step, extraction (forward +
top-k), the student's offline KD step and online KD step (teacher forward and the temperature
search inside) — from abstract inputs only (`jax.eval_shape` params and optimizer state,
`ShapeDtypeStruct`s carrying their shardings), lowers and compiles them ahead of time on a mesh
of the configured shape made of fake CPU devices, and prints per device: params, optimizer state,
teacher, batch, the compiler's temporaries (`compiled.memory_analysis()`), the total, and which
accelerators it fits. The architecture comes from the config's `teacher.model` / `student.model`
blocks (their paths need not exist). The compiler is the CPU's: its fusion and rematerialisation
differ from TPU/GPU compilers, so temporaries are an estimate; the argument sizes are exact. The
last line is one summary line.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Sequence

from first_jax.runtime.errors import UserError
from first_jax import config as config_lib

GIB = 1 << 30
# Usable memory per device (GiB), as sold.
ACCELERATORS = (("TPU v5e", 16), ("TPU v4", 32), ("H100", 80), ("TPU v5p", 95), ("H200", 141))


def _device_count(cfg, argv_devices: int | None) -> int:
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
  fixed = math.prod(s for s in sizes if s != -1)
  if argv_devices is not None:
    return argv_devices
  if -1 in sizes:
    raise UserError("mesh: a plan needs every mesh size fixed (no -1), or --devices N")
  return fixed


def _per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  import jax
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * x.dtype.itemsize
  return total


@dataclasses.dataclass
class Program:
  name: str
  params: int = 0
  opt_state: int = 0
  teacher: int = 0
  batch: int = 0
  temp: int = 0
  argument: int = 0
  output: int = 0
  alias: int = 0
  compile_s: float = 0.0

  @property
  def total(self) -> int:
    """Peak estimate: live arguments, outputs not aliased to them, and temporaries."""
    return self.argument + self.output - self.alias + self.temp


def _sds(tree: Any, shardings: Any) -> Any:
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _model(spec, mesh):
  """(module, abstract placed params) of the teacher or student (a `ModelSpec`) from its
  `model` block."""
  from first_jax import models
  from first_jax.runtime import sharding
  mc = spec.config()
  boxed = models.abstract_params(mc)
  shardings = sharding.param_shardings(boxed, mesh, sharding.DEFAULT_RULES,
                                       spec.on_indivisible)
  return models.Decoder(mc), _sds(sharding.unbox(boxed), shardings), mc


def _batch(mesh, b: int, length: int, k: int, kd: bool, answer_only: bool) -> dict:
  import jax
  import numpy as np
  from first_jax.runtime import sharding
  bs = sharding.batch_sharding(mesh)
  spec = {"input_ids": ((b, length), np.int32), "attention_mask": ((b, length), np.int32),
          "targets": ((b, length), np.int32), "loss_mask": ((b, length), np.float32),
          "valid": ((b,), np.float32)}
  if answer_only:  # multiple choice: the answer position and the letters' ids (4 choices)
    spec.update(answer_pos=((b,), np.int32), choice_ids=((b, 4), np.int32))
  if kd:
    spec.update(teacher_ids=((b, length, k), np.int32),
                teacher_logprobs=((b, length, k), np.float32),
                teacher_tail=((b, length), np.float32))
  return {n: jax.ShapeDtypeStruct(s, d, sharding=bs) for n, (s, d) in spec.items()}


def _compile(prog: Program, jitted, *args) -> Program:
  t0 = time.time()
  compiled = jitted.lower(*args).compile()
  prog.compile_s = time.time() - t0
  m = compiled.memory_analysis()
  prog.temp, prog.argument = int(m.temp_size_in_bytes), int(m.argument_size_in_bytes)
  prog.output, prog.alias = int(m.output_size_in_bytes), int(m.alias_size_in_bytes)
  return prog


def _train_program(name, cfg, mesh, module, params, optim, spec, batch, teacher=None,
                   events=None) -> Program:
  import functools
  import jax
  from first_jax.core import step
  from first_jax.engine import trainer
  tx = step.make_optimizer(lr=optim.lr, total_steps=1000, warmup_ratio=optim.warmup_ratio,
                           weight_decay=optim.weight_decay, clip_norm=optim.clip_norm,
                           b1=optim.b1, b2=optim.b2, eps=optim.eps, grad_accum=optim.grad_accum)
  state_sh = trainer.state_shardings(tx, params, events, mesh)
  abstract = jax.eval_shape(functools.partial(step.init_state, tx=tx), params,
                            events=events)
  state = _sds(abstract, state_sh)
  t_module, t_params = teacher if teacher is not None else (None, None)
  step_fn = trainer.jit_step(
      module, spec, tx, mesh, batch["valid"].sharding, state_sh, teacher_module=t_module,
      teacher_sh=None if t_params is None else jax.tree.map(lambda x: x.sharding, t_params))
  prog = Program(name, params=_per_device(params), opt_state=_per_device(state.opt_state),
                 teacher=_per_device(t_params) if t_params is not None else 0,
                 batch=_per_device(batch))
  return _compile(prog, step_fn, state, batch, t_params)


def plan(cfg) -> list[Program]:
  import jax
  import jax.numpy as jnp
  from first_jax.engine import infer
  from first_jax.engine.job import Job
  from first_jax.core import step
  job = Job(cfg)
  mesh = job.mesh
  length, k = cfg.data.max_len, cfg.extract.k
  ao = job.answer_only
  t_mod, t_params, _ = _model(job.teacher, mesh)
  s_mod, s_params, _ = _model(job.student, mesh)
  ft = cfg.finetune
  out = [_train_program("finetune (teacher)", cfg, mesh, t_mod, t_params, ft,
                        step.LossSpec(kind="ce", answer_only=ao),
                        _batch(mesh, ft.batch_size, length, k, False, ao))]
  eb = _batch(mesh, cfg.extract.batch_size, length, k, False, ao)
  eb = {n: eb[n] for n in ("input_ids", "attention_mask", "answer_pos") if n in eb}
  ex = Program("extract (teacher forward + top-k)", params=_per_device(t_params),
               batch=_per_device(eb))
  out.append(_compile(ex, infer.topk_program(t_mod, t_params, k, ao, mesh), t_params, eb))
  if any("sampled" in name.partition("@")[0].split("-") for name in cfg.students):
    sb = {**eb, "example_id": jax.ShapeDtypeStruct(eb["input_ids"].shape[:1], jnp.int32,
                                                   sharding=eb["input_ids"].sharding)}
    sp = Program("sample (teacher forward + priority sample)", params=_per_device(t_params),
                 batch=_per_device(sb))
    out.append(_compile(sp, infer.sample_program(t_mod, t_params, cfg.extract.samples, 1.0,
                                                 cfg.extract.sample_seed, ao, mesh),
                        t_params, sb))
  d = cfg.distill
  kd = dict(kind="topk_kd", k=k, tail=d.tail, direction=d.direction,
            temperature_mode=d.temperature_mode, num_bins=cfg.calibrate.num_bins,
            answer_only=ao)
  out.append(_train_program("distill offline (student, store targets)", cfg, mesh, s_mod,
                            s_params, d, step.LossSpec(**kd),
                            _batch(mesh, d.batch_size, length, k, True, ao)))
  events = jax.eval_shape(lambda: step.event_buffer(d.search_events, k))
  events = _sds(events, jax.tree.map(lambda _: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()), events))
  out.append(_train_program("distill online (teacher in step, searched t)", cfg, mesh, s_mod,
                            s_params, d,
                            step.LossSpec(**kd, online=True, search=True,
                                          search_events=d.search_events,
                                          search_min_events=d.search_min_events),
                            _batch(mesh, d.batch_size, length, k, False, ao),
                            teacher=(t_mod, t_params), events=events))
  return out


def report(progs: list[Program], cfg, devices: int) -> str:
  mesh = f"data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor}"
  unit, div = ("GiB", GIB) if max(p.total for p in progs) >= GIB else ("MiB", 1 << 20)
  _gib = lambda x: f"{x / div:7.2f}"  # noqa: E731
  lines = [f"memory plan per device ({unit}), {devices} devices, mesh {mesh}, CPU compiler",
           f"{'program':46s} {'params':>7s} {'opt':>7s} {'teacher':>7s} {'batch':>7s} "
           f"{'temp':>7s} {'total':>7s}  fits"]
  worst = 0
  for p in progs:
    fits = [n for n, gib in ACCELERATORS if p.total <= gib * GIB]
    worst = max(worst, p.total)
    lines.append(f"{p.name:46s} {_gib(p.params)} {_gib(p.opt_state)} {_gib(p.teacher)} "
                 f"{_gib(p.batch)} {_gib(p.temp)} {_gib(p.total)}  "
                 f"{', '.join(fits) if fits else 'none of ' + ACCELERATORS[-1][0]} "
                 f"(compiled in {p.compile_s:.0f} s)")
  fits = [n for n, gib in ACCELERATORS if worst <= gib * GIB]
  lines.append(f"plan: peak {worst / GIB:.2f} GiB per device over {len(progs)} programs; fits: "
               f"{', '.join(fits) if fits else 'none of the listed devices'}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  from first_jax.runtime import log
  argv = list(sys.argv[1:] if argv is None else argv)
  log.setup()
  devices = None
  if "--devices" in argv:
    i = argv.index("--devices")
    try:
      devices = int(argv[i + 1])
    except (IndexError, ValueError):
      print("error: --devices: expected a number of devices", file=sys.stderr)
      return 2
    del argv[i:i + 2]
  try:
    cfg = config_lib.parse(argv)
    n = _device_count(cfg, devices)
    # Before any backend starts: a mesh of n fake CPU devices (the plan never allocates).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    config_lib.validate(cfg, check_paths=False)
    cfg.lock()
    print(report(plan(cfg), cfg, n))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
