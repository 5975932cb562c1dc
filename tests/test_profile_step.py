"""bench/profile_step.py: thunk names -> HLO op_name metadata -> parts of the step."""
import jax
import jax.numpy as jnp
import numpy as np

from bench import profile_step


def test_hlo_op_names_name_the_compiled_instructions_forward_and_backward():
  def f(x_NxD, w_DxD):
    return jnp.sum(jnp.tanh(x_NxD @ w_DxD))
  rng = np.random.default_rng(0)
  x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((16, 32), (32, 32)))
  text = jax.jit(jax.grad(f, argnums=1)).lower(x, w).compile().as_text()
  names = profile_step.hlo_op_names(text)
  assert names and all(isinstance(v, str) and v for v in names.values())
  ops = set(names.values())
  assert any("transpose(jvp(" in o for o in ops)  # the backward pass is named as such
  assert any("jvp(" in o and "transpose(" not in o for o in ops)


def test_categories_split_phase_part_and_matmuls():
  layer = "jit(train_step)/{}(Decoder)/Decoder.hidden/while/body/closed_call/layers/"
  cat = profile_step.category
  assert cat(layer.format("jvp") + "mlp/down_proj/dot_general", "ynn") == \
      "forward | mlp | matmul"
  assert cat(layer.replace("{}(Decoder)", "transpose(jvp(Decoder))") +
             "attn/q_proj/dot_general", "ynn") == "backward | attention projections | matmul"
  assert cat(layer.format("jvp") + "attn/bgrlm,bmge->blgre/exp", "fusion") == \
      "forward | attention core | non-matmul"
  assert cat("jit(train_step)/jvp(Decoder)/Decoder.logits_from_hidden/...d,vd->...v/"
             "dot_general", "ynn") == "forward | output head | matmul"
  assert cat("jit(train_step)/cond/branch_1_fun/mul", "fusion") == \
      "optimizer/other | optimizer | non-matmul"
