"""bench/run.py (python -m bench.run): every section end to end on a tiny random model (and
tiny search / loss-memory shapes), the JSON keys, the store-size arithmetic by hand, and the
NumPy search and naive loss baselines against first_jax. No timing assertions (shared, noisy
CPUs)."""
from __future__ import annotations

import importlib
import json
import math
import os
import sys

import numpy as np
import pytest

# Slow (the default suite's 10-minute budget): the harness end to end on a tiny model.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE_KEYS = ("store_bytes_per_token", "extraction_speedup_vs_torch",
                 "postforward_speedup_vs_reference", "step_speedup_vs_torch", "step_mfu",
                 "step_kd_mfu", "search_speedup_vs_numpy", "loss_memory_ratio_vs_naive",
                 "store_bytes_per_position_sampled", "extraction_sampled_vs_topk_time")
# the search and loss_memory sections at tiny shapes
TINY = ["--search-events", "2000", "--search-temps", "40", "--loss-positions", "32",
        "--loss-vocab", "3000", "--loss-vocab-chunk", "1024"]


@pytest.fixture(scope="module")
def bench_run():
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  return importlib.import_module("bench.run")


@pytest.fixture(scope="module")
def bench_module(bench_run):
  """bench.common or a section's module (bench.sections.<name>) by its name."""
  return lambda name: importlib.import_module(
      "bench.common" if name == "common" else f"bench.sections.{name}")


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
  """A tiny random Llama (tied embeddings, GQA) saved by transformers."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=True)
  d = tmp_path_factory.mktemp("tiny_llama")
  transformers.LlamaForCausalLM(cfg).save_pretrained(d)
  return str(d)


def _hand_record_bytes(k, v, length, positions):
  bits = math.ceil(math.log2(v))  # V is not a power of two here
  return (8 + 8 + math.ceil(length / 8) + math.ceil(positions * k * bits / 8)
          + 2 * positions * k + 2 * positions)


def test_store_arithmetic_matches_hand_computation(bench_module):
  store = bench_module("store")
  out = store.store_arithmetic(k=5)
  for v in (49_152, 151_936):
    for name, (length, positions) in store.STORE_LAYOUTS.items():
      got = out[str(v)]["layouts"][name]
      want = _hand_record_bytes(5, v, length, positions)
      assert got["bytes_per_example"] == want, (v, name)
      assert got["bytes_per_scored_token"] == pytest.approx(want / positions)
    assert out[str(v)]["dense_bf16_bytes_per_position"] == 2 * v
  # 18-bit ids at V=151,936: (16 + 64 + 2880 + 2560 + 512) / 256
  assert out["151936"]["layouts"]["text_responses"]["bytes_per_scored_token"] == 6032 / 256
  assert out["49152"]["layouts"]["text_responses"]["bytes_per_scored_token"] == 5712 / 256
  assert out["49152"]["layouts"]["multiple_choice"]["bytes_per_example"] == 50
  # a sampled store (U = 10 slots) beside each: within twice the top-5 store's bytes (issue 26)
  out = store.store_arithmetic(k=5, samples=10)
  for v in (49_152, 151_936):
    for name, (length, positions) in store.STORE_LAYOUTS.items():
      got = out[str(v)]["layouts"][name]
      assert got["sampled"]["bytes_per_example"] == _hand_record_bytes(10, v, length, positions)
      assert 1 < got["sampled"]["vs_topk"] <= 2, (v, name)


def test_reference_jsonl_format():
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from bench import baselines_torch
  row = baselines_torch.jsonl_row(np.array([[7, 3]]), np.array([[-0.5, -0.1]], np.float32))
  # values are float32 numbers printed as Python floats, as .item() gives them
  assert row == '[{"7": -0.5, "3": -0.10000000149011612}]\n'
  assert baselines_torch.jsonl_bytes(np.zeros((2, 1, 2), int), np.zeros((2, 1, 2))) == 2 * len(
      '[{"0": 0.0}]\n')  # equal ids collapse into one key, as in a dict


def test_interleaved_alternates_and_summarises(bench_module):
  calls = []
  t = bench_module("common").interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            warmup=1, reps=3)
  assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
  for name in ("a", "b"):
    assert t[name]["n"] == 3 and len(t[name]["times_s"]) == 3
    assert t[name]["min_s"] <= t[name]["median_s"] <= t[name]["max_s"]
    assert t[name]["first_s"] is not None


def test_bench_runs_end_to_end(bench_run, tiny_hf_dir, tmp_path):
  out = tmp_path / "bench.json"
  code = bench_run.main(["--quick", "--model", tiny_hf_dir, "--text", "random", "--batch", "2",
                         "--length", "8", "--warmup", "1", "--reps", "1", "--mass-batches", "2",
                         "--peak-n", "32", *TINY, "--out", str(out)])
  assert code == 0
  r = json.loads(out.read_text())
  for key in HEADLINE_KEYS:
    assert isinstance(r[key], float) and np.isfinite(r[key]), key
  assert "not_in_this_harness" not in r
  assert r["store_bytes_per_token"] == 6032 / 256
  assert r["store_bytes_per_position_sampled"] == 11472 / 256  # 10 slots: 18-bit ids + 2 B each
  assert set(r["sections"]) == {"store", "extraction", "postforward", "step", "search",
                                "loss_memory", "matmul_peak"}
  meta = r["meta"]
  for key in ("date_utc", "git", "cpu", "versions", "jax_backend", "wall_s", "torch_threads"):
    assert key in meta
  assert meta["cpu"]["cores_available"] >= 1
  assert {"jax", "flax", "torch", "transformers"} <= set(meta["versions"])
  assert r["settings"]["batch"] == 2 and r["settings"]["length"] == 8
  assert r["model"]["config"]["vocab_size"] == 320

  st = r["sections"]["store"]
  assert st["topk_mass_share"]["positions"] == 2 * 2 * 8
  share = st["topk_mass_share"]["share_by_k"]
  assert 0 < share["1"]["mean"] <= share["5"]["mean"] <= share["20"]["mean"] <= 1 + 1e-6
  jsonl = st["by_vocab"]["151936"]["reference_jsonl_bytes_per_position"]["uniform_ids"]
  assert 5 * len('"123456": -1.0, ') < jsonl < 200  # five keys with float values
  ex = r["sections"]["extraction"]
  assert ex["shapes"]["input_ids"] == [2, 8] and ex["shapes"]["logits"] == [2, 8, 320]
  # the same weights on both sides (first_jax's export loaded by transformers)
  assert ex["agreement"]["top1_same_id"] == 1.0
  assert ex["agreement"]["max_abs_logprob_diff_where_same"] < 1e-3
  for name in ("first_jax", "torch"):
    assert ex["timings"][name]["n"] == 1 and ex["tokens_per_s"][name] > 0
  pf = r["sections"]["postforward"]
  assert set(pf["timings"]) == {"first_jax", "reference", "first_jax_topk_only",
                                "first_jax_write_only", "xla_top_k", "xla_exp_sum_pass",
                                "xla_mul_sum_pass"}
  assert pf["bytes_written"]["reference_jsonl"] > pf["bytes_written"]["first_jax_store"] > 0
  sp = r["sections"]["step"]
  losses = sp["loss_at_first_step"]
  assert losses["first_jax"] == pytest.approx(losses["torch"], rel=1e-4)
  assert sp["train_flops_per_step"] > 0 and sp["mfu"]["torch"] > 0
  assert set(sp["timings"]) == {"first_jax", "torch", "first_jax_xla_default"}
  assert losses["first_jax_xla_default"] == pytest.approx(losses["first_jax"], rel=1e-5)
  assert sp["speedup_from_xla_options"] > 0
  assert sp["kd"]["spec"]["kind"] == "topk_kd" and sp["kd"]["timings"]["first_jax_kd"]["n"] == 1
  assert np.isfinite(sp["kd"]["loss_at_first_step"]) and sp["kd"]["loss_at_first_step"] >= 0
  assert sp["tokens_per_s"]["first_jax_kd"] > 0 and sp["mfu"]["first_jax_kd"] == r["step_kd_mfu"]

  se = r["sections"]["search"]  # the section itself asserts the agreement; its record:
  assert se["shapes"]["events"] == 2000 and se["shapes"]["temperatures"] == 40
  assert se["agreement"]["max_abs_ece_diff"] <= se["agreement"]["atol"]
  assert se["agreement"]["best_t"]["first_jax"] == se["agreement"]["best_t"]["numpy"]
  assert r["search_speedup_vs_numpy"] == se["speedup_vs_numpy"]
  lm = r["sections"]["loss_memory"]
  assert lm["shapes"]["logits"] == [32, 3000] and "not the issue's" in lm["positions_note"]
  temp = lm["temp_bytes"]
  assert temp["naive"]["forward_grad"] >= lm["logits_input_bytes"]  # a [B*L, V] temporary
  assert temp["chunked"]["forward_grad"] < temp["naive"]["forward_grad"] / 4
  assert r["loss_memory_ratio_vs_naive"] == pytest.approx(
      temp["chunked"]["forward_grad"] / temp["naive"]["forward_grad"])
  loss = lm["agreement"]["loss"]
  assert loss["chunked"] == pytest.approx(loss["naive"], rel=1e-4)
  for name in ("chunked", "naive"):
    rss = lm["peak_rss_bytes"][name]
    assert "error" not in rss, rss
    assert rss["maxrss_after_run"] >= rss["maxrss_with_inputs"] > 0
    # the child's own peak (not this process's, inherited across execve)
    assert rss["vmhwm_after_run"] == pytest.approx(rss["maxrss_after_run"], rel=0.2)


@pytest.mark.parametrize("mode,tail", [("prob_softmax", True), ("log_space", False)])
def test_numpy_search_baseline_matches_first_jax(bench_module, mode, tail):
  import jax
  from first_jax.core import temperature
  search = bench_module("search")
  ev = search.synthetic_events(3000, 5, 1000, seed=1)
  grid = np.geomspace(0.05, 20.0, 30).astype(np.float32)
  res = jax.device_get(temperature.search(
      ev["logprobs"], ev["ids"], ev["targets"], mode=mode, refine=False, grid=grid,
      tail_logmass_N=ev["tail"] if tail else None))
  got = search.numpy_ece_curve(ev["logprobs"], ev["ids"], ev["targets"],
                               ev["tail"] if tail else None, grid, mode)
  np.testing.assert_allclose(got, res.ece_T, atol=1e-5)
  assert grid[np.argmin(got)] == res.best_t
  assert np.ptp(got) > 0.01  # the curve is not flat: the argmin means something


def test_naive_loss_is_topk_kd(bench_module):
  import jax
  from first_jax.core import losses
  loss_memory = bench_module("loss_memory")
  x, ids, lp, tail, mask = loss_memory._loss_inputs(6, 500, 5)
  mask = mask.at[2].set(0.0)
  got = loss_memory.naive_topk_kd(x, ids, lp, tail, mask)
  want = losses.topk_kd(x, ids, lp, mask, teacher_tail_logmass_BxL=tail, vocab_chunk=128)
  np.testing.assert_allclose(jax.device_get(got), jax.device_get(want), rtol=1e-5)


def test_only_and_bad_arguments(bench_run):
  with pytest.raises(SystemExit):
    bench_run.parse(["--quick", "--only", "store,nope"])
  with pytest.raises(SystemExit):
    bench_run.parse(["--quick", "--full"])
  with pytest.raises(SystemExit):
    bench_run.parse(["--quick", "--search-temps", "0"])
  s, only, out = bench_run.parse(["--full", "--only", "step,store", "--reps", "2"])
  assert only == ("step", "store") and s.reps == 2 and s.batch == 8 and out is None
  # the shapes in --full: 1,000 temperatures x 100k events; B*L = 8,192 at V = 151,936
  assert (s.search_temps, s.search_events, s.loss_positions, s.loss_vocab) == (
      1000, 100_000, 8192, 151_936)
  s, only, _ = bench_run.parse(["--quick", "--only", "search,loss_memory", "--no-loss-rss"])
  assert only == ("search", "loss_memory") and s.loss_positions == 1024 and not s.loss_rss


def test_device_check_script_dry_run_on_the_cpu(tiny_hf_dir, tmp_path):
  """bench/device_check.sh end to end with the PyTorch baselines on the CPU and tiny shapes:
  bench.run at bfloat16, the smoke pipeline at bfloat16, one JSON with every section's ratio."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "check"
  args = ["--model", tiny_hf_dir, "--text", "random", "--batch", "2", "--length", "8",
          "--warmup", "1", "--reps", "1", "--mass-batches", "2", "--peak-n", "32", *TINY]
  env = {**os.environ, "BENCH_TORCH_DEVICE": "cpu", "PYTHON": sys.executable,
         "BENCH_ARGS": " ".join(args),
         "SMOKE_ARGS": "--config.data.synthetic_size=120 --config.finetune.epochs=1 "
                       "--config.distill.epochs=1"}
  subprocess.run(["bash", "bench/device_check.sh", str(out)], cwd=root, env=env, check=True)
  r = json.loads((out / "device_check.json").read_text())
  assert r["dtype"] == "bfloat16" and r["jax_backend"] == "cpu"
  assert r["spec_peak_bf16_flops"] is None  # a CPU is not on the spec sheet
  for key in ("extraction_speedup_vs_torch", "step_speedup_vs_torch"):
    assert np.isfinite(r["ratios"][key]) and r["ratios"][key] > 0, key
  assert r["sections"]["step"]["tokens_per_s"]["first_jax"] > 0
  assert {"sft", "kd", "first"} <= set(r["smoke_models"])
  assert set(r["smoke_stage_s"]) >= {"finetune", "extract", "calibrate", "train", "evaluate"}
  from bench import device_check
  assert device_check.spec_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert device_check.spec_peak("NVIDIA H100 PCIe") == 756e12
