"""bench/demo_time.py's padded shares, counted independently on random right-padded rows."""
import os

import ml_collections
import numpy as np
import pytest

from bench import demo_time


def _rows(n: int, length: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  lengths_N = rng.integers(3, length + 1, n)
  mask_NxL = (np.arange(length)[None] < lengths_N[:, None]).astype(np.int32)
  return {"input_ids": rng.integers(0, 50, (n, length)).astype(np.int32),
          "attention_mask": mask_NxL}


def test_unbucketed_batches_pad_every_row_to_the_full_length():
  rows = _rows(50, 32, seed=0)
  optim = ml_collections.ConfigDict(dict(batch_size=8, epochs=2, length_buckets=()))
  got = demo_time._train_share(rows, optim, seed=3)
  assert got["positions"] == 2 * (50 // 8) * 8 * 32  # remainder dropped, every epoch
  # the rows a shuffled epoch drops differ, so the real count lies between these
  lengths = np.sort(rows["attention_mask"].sum(-1))
  assert 2 * lengths[:48].sum() <= got["real_tokens"] <= 2 * lengths[-48:].sum()
  scored = demo_time._scored_share([rows], 8, (), shortest_first=False)
  # 7 batches, the last filled with 6 copies of its first row (row 48)
  assert scored["positions"] == 7 * 8 * 32
  assert scored["real_tokens"] == lengths.sum() + 6 * rows["attention_mask"][48].sum()
  assert scored["padded_share"] == round(1 - scored["real_tokens"] / scored["positions"], 4)


def test_buckets_cut_positions_and_keep_every_token():
  rows = _rows(64, 32, seed=1)
  flat = ml_collections.ConfigDict(dict(batch_size=8, epochs=1, length_buckets=()))
  cut = ml_collections.ConfigDict(dict(batch_size=8, epochs=1, length_buckets=(8, 16, 32)))
  a, b = demo_time._train_share(rows, flat, 0), demo_time._train_share(rows, cut, 0)
  assert a["real_tokens"] == b["real_tokens"] == rows["attention_mask"].sum()  # 64 = 8 x 8
  assert b["positions"] < a["positions"] and b["padded_share"] < a["padded_share"]
  s = demo_time._scored_share([rows], 8, (8, 16, 32), shortest_first=True)
  lengths = np.sort(rows["attention_mask"].sum(-1)).reshape(8, 8)
  widths = [min(w for w in (8, 16, 32) if w >= longest) for longest in lengths.max(-1)]
  assert s["positions"] == 8 * sum(widths) and s["real_tokens"] == lengths.sum()


def test_variants_are_flags_the_pipeline_accepts():
  from first_jax import config as config_lib
  demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "demo.py")
  cfg = config_lib.load(["--config", demo,
                         *demo_time.flags(demo_time.VARIANTS["before"])])
  assert cfg.finetune.length_buckets == cfg.distill.length_buckets == ()
  assert demo_time.flags(demo_time.VARIANTS["after"]) == []
  f32 = config_lib.load(["--config", demo, *demo_time.flags(demo_time.VARIANTS["shipped_float32"])])
  assert f32.teacher.model.dtype == f32.student.model.dtype == "float32"
  shipped = config_lib.load(["--config", demo])
  assert shipped.teacher.model.dtype == shipped.student.model.dtype == "bfloat16"


def test_overrides_of_any_depth_reach_the_config(monkeypatch):
  """`padding` applies a variant's overrides to the config it counts with (the float32
  variant's keys are three deep)."""
  seen = {}
  from first_jax.engine import job

  def stop(cfg):
    seen["cfg"] = cfg
    raise RuntimeError("stop")
  monkeypatch.setattr(job, "Job", stop)
  with pytest.raises(RuntimeError, match="stop"):
    demo_time.padding(demo_time.VARIANTS["shipped_float32"])
  assert seen["cfg"].teacher.model.dtype == "float32"
