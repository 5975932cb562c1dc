"""What each distillation row of a trust study costs per training step (issue 26): the offline
rows read a store (top-k: `kd`, `first`; sampled: `kd-sampled`, `first-sampled`), `full_kd` runs
the teacher inside the step. One batch of the study's training data, each variant's step as the
train stage compiles it (`train.parse_variant`, `trainer.compile_step`), timed interleaved so a
busy machine slows every row alike; beside it the matmul FLOPs of a step (student forward +
backward, teacher forward: `bench.common.forward_flops`) and the store bytes each row reads.

    python -m bench.distill_cost --config configs/trust_vader.py \
        --workdir workdir/trust_vader_rows/seed0 --out docs/benchmarks/distill_cost.json

The workdir must hold the study's fine-tuned teacher (`teacher/`), its top-k store and the
sampled stores (`bench/run_trust_rows.sh` leaves them).
"""
from __future__ import annotations

import argparse
import json
import os

ROWS = ("sft", "kd", "first", "kd-sampled", "first-sampled", "full_kd")


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--rows", default=",".join(ROWS))
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--reps", type=int, default=8)
  a = ap.parse_args(argv)

  import jax
  from bench.common import environment, forward_flops, interleaved, log
  from first_jax import config as config_lib
  from first_jax.core import step as step_lib
  from first_jax.data import batches
  from first_jax.engine import trainer
  from first_jax.engine.job import Job
  from first_jax.runtime import io_util, sharding
  from first_jax.stages import train

  job = Job(config_lib.load(["--config", a.config, f"--config.workdir={a.workdir}"]))
  cfg, d = job.cfg, job.cfg.distill
  arrays = job.data.splits["train"]
  batch_sh = sharding.batch_sharding(job.mesh)
  student = job.init_model("student")
  teacher = job.load_export(job.layout.teacher, "teacher")
  tx = step_lib.make_optimizer(lr=d.lr, total_steps=1_000_000, warmup_ratio=0.0,
                               weight_decay=d.weight_decay, clip_norm=d.clip_norm, b1=d.b1,
                               b2=d.b2, eps=d.eps)
  fns, rows = {}, {}
  for name in a.rows.split(","):
    v = train.parse_variant(name, cfg)
    t = train.teacher_temperature(job, v.spec)
    add, extra, rows[name] = None, {}, {"store": None}
    if v.needs_teacher and not v.spec.online:
      reader = train.open_store(job, v.spec, t)
      add = train.store_targets(reader)
      m = reader.manifest
      size = sum(s["bytes"] for s in m["shards"])
      rows[name] = {"store": os.path.relpath(reader.store_dir, a.workdir), "k": m["k"],
                    "store_bytes": size,
                    "store_bytes_per_scored_token": round(size / m["scored_tokens"], 2)}
    elif v.spec.online:
      extra = dict(teacher_module=teacher.module, teacher_params=teacher.params)
    # the same rows for every variant: the first batch of the study's seed-0 order, full length
    it = batches.BatchIterator(arrays, d.batch_size, seed=0, shuffle=True, drop_remainder=True,
                               add_fields=add)
    batch = {k: v_ for k, v_ in next(it).items() if k != "example_id"}
    params = jax.tree.map(lambda x: jax.device_put(x.copy(), x.sharding), student.params)
    state, fn = trainer.compile_step(student.module, params, v.spec, tx, job.mesh, batch_sh,
                                     initial_temperature=t, **extra)
    holder = {"state": state, "batch": jax.device_put(batch, batch_sh), "fn": fn,
              "teacher": extra.get("teacher_params")}

    def run(h=holder):  # as trainer.fit: the teacher's params (online) are the 3rd argument
      st, _ = h["fn"](h["state"], h["batch"], h["teacher"])
      h["state"] = jax.block_until_ready(st)

    fns[name] = run
    rows[name].update(kind=v.spec.kind, online=v.spec.online, temperature=round(t, 4),
                      batch=list(batch["input_ids"].shape))
    log(f"distill_cost: {name} ({v.spec.kind}) compiled")
  env = environment()  # its load average: another job slows every row
  times = interleaved(fns, a.warmup, a.reps)
  env["load_avg_end"] = list(os.getloadavg())
  base = times["kd"]["median_s"] if "kd" in times else None
  for name, tm in times.items():
    rows[name]["step"] = tm
    if base:
      rows[name]["step_vs_kd"] = round(tm["median_s"] / base, 3)
  b, l = batch["input_ids"].shape  # every row's batch: the same rows and length
  s_fl, t_fl = (forward_flops(m.config, b, l)["total"] for m in (student, teacher))
  out = {
      "what": "one training step per distillation row of the study, each as the train stage "
              "compiles it, on the same batch (the study's batch size, full max_len, no "
              "bucketing), timed interleaved (bench.common.interleaved: the order flips every "
              "round); store bytes per record as each row's store holds them",
      "config": a.config, "workdir": a.workdir, "rows": rows,
      "forward_flops": {"student": s_fl, "teacher": t_fl,
                        "full_kd_vs_offline": round((3 * s_fl + t_fl) / (3 * s_fl), 3)},
      "environment": env, "warmup": a.warmup, "reps": a.reps,
  }
  io_util.atomic_write_json(a.out, out)
  log(json.dumps({n: (r.get("step_vs_kd"), r["step"]["median_s"]) for n, r in rows.items()}))
  return out


if __name__ == "__main__":
  main()
