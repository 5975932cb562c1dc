"""`first_jax.plan`: every program of a run compiled from abstract inputs on the configured mesh,
with per-device bytes; the paper-scale configs pass the config check without their weights."""
import math
import os

import jax
import pytest

from first_jax import config as config_lib, models, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~20 s: the default suite's 10-minute budget
def test_plan_of_the_smoke_config_on_a_data_x_fsdp_mesh():
  cfg = config_lib.load(["--config", os.path.join(ROOT, "configs", "smoke.py"),
                         "--config.mesh.data=4", "--config.mesh.fsdp=2"])
  progs = plan.plan(cfg)
  assert [p.name.split()[0] for p in progs] == ["finetune", "extract", "distill", "distill"]
  teacher = models.ModelConfig.from_dict(cfg.teacher.model.to_dict())
  total = sum(math.prod(x.shape) * x.dtype.itemsize
              for x in jax.tree.leaves(models.abstract_params(teacher)))
  ft, ex, off, on = progs
  # fsdp=2 splits every weight with an embed axis in two (norm scales are replicated)
  assert total / 2 <= ex.params <= total / 2 * 1.05
  assert ft.params == ex.params and on.teacher == ex.params
  assert ft.opt_state == pytest.approx(2 * ft.params, rel=0.01)  # AdamW: mu and nu
  for p in progs:
    assert p.temp > 0 and p.total >= p.argument > 0
  text = plan.report(progs, cfg, 8)
  assert text.splitlines()[-1].startswith("plan: peak ") and "H200" in text.splitlines()[-1]


@pytest.mark.parametrize("name", ["qwen1_5_7b_to_1_8b", "llama2_13b_to_7b"])
def test_paper_scale_configs_pass_the_config_check_without_weights(name):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  cfg = config_lib.load_file(path)
  assert not os.path.exists(cfg.teacher.path)  # no weights here
  config_lib.validate(cfg, check_paths=False)  # the mesh (1, 8, 1): the 8 test devices
  assert (cfg.data.max_len, cfg.extract.k, cfg.distill.lr, cfg.distill.epochs) == (
      2048, 5, 2e-6, 3)
  assert cfg.distill.batch_size * cfg.distill.grad_accum == 128
  assert cfg.teacher.model.param_dtype == "bfloat16" and cfg.teacher.model.remat
