"""first_jax against what a user would run instead, side by side in one run (issue 11).

    python -m bench.run --quick [--out FILE.json] [--only store,extraction,postforward,step,...]
    python -m bench.run --full --out FILE.json        # the figures for docs/benchmarks.md

Run from the repository root on a quiet machine: every section times first_jax and its baseline
in the same process, warm-up calls first, then repetitions in which the two alternate (the order
flips every repetition, so a slow drift of the machine hits both); the JSON keeps every time,
the median and the spread (min, max, quartiles), the CPU model, core count, library versions,
date, git commit and the exact shapes. Ratios measured in one run are the figures to quote.

Sections (each a function `ctx, settings -> dict`):
  store        bytes per stored token at k=5 for V = 49,152 and 151,936 (first_jax.data.store's
               StoreSpec arithmetic) vs the reference code's JSONL (measured: real top-5 values
               json-dumped as it does) and vs dense bf16 logits (2V B/position); bytes per
               multiple-choice example (L=96, one scored position) vs storing every position;
               the share of the teacher's probability mass inside its top-k on ordinary text
  extraction   tokens/s of teacher forward + top-k over all positions: first_jax's extraction
               program (infer.topk_program) vs transformers' PyTorch
               model + log_softmax + batched torch.topk on the same weights (first_jax's HF
               export loaded by AutoModelForCausalLM)
  postforward  given the logits: first_jax's top-k + tail + packing + a store shard written with
               StoreWriter vs the reference code's full log_softmax + Python loop of {id: value}
               dicts + JSONL
  step         one AdamW step, full-position cross-entropy (step.train_step kind="ce", jitted
               with donation by trainer.compile_step, as training runs it) vs a PyTorch AdamW
               step on the transformers model; MFU of each against the f32 matmul peak
               measured in this run (jnp.dot / torch.mm of [n, n]). Then, timed on its own
               after that comparison, first_jax's offline top-k KD step (LossSpec
               kind="topk_kd", targets teacher_ids / teacher_logprobs / teacher_tail in the
               batch as the store gives them): tokens/s and MFU beside ce (no torch baseline)
  search       the ECE temperature search of the calibrate stage (temperature.search: every
               grid temperature scored in one compiled lax.scan, refine off so the curve is the
               grid) vs a NumPy loop over the temperatures (`numpy_ece_curve`: vectorised over
               the events), 1,000 temperatures x 100k seeded synthetic events (top-5 log-probs +
               tail); the section asserts both give the same ECE curve and best temperature
  loss_memory  top-k KD loss memory at V = 151,936, B*L = 8,192 (--quick: B*L = 1,024):
               losses.topk_kd with a chunked log-normaliser (and fused, as the step calls it) vs
               `naive_topk_kd` (full-vocabulary log_softmax, take_along_axis at the k ids, KL):
               XLA's compiled temporaries (memory_analysis, abstract shapes, as
               bench/math_memory.py) of forward and forward+grad, and the peak RSS
               (ru_maxrss) of a child process running each forward+grad once (the f32 [B*L, V]
               logits input and its gradient are not temporaries; --full's naive child needs
               about 20 GB of RAM)

Headline keys at the top of the JSON: store_bytes_per_token (V=151,936, L=512, P=256),
extraction_speedup_vs_torch, postforward_speedup_vs_reference, step_speedup_vs_torch, step_mfu,
step_kd_mfu, search_speedup_vs_numpy, loss_memory_ratio_vs_naive (chunked / naive compiled
temporaries of forward+grad: lower is better, the issue's target <= 0.25)
(a speedup > 1 means first_jax is faster). The teacher is SmolLM2-135M-Instruct (the project's
`smollm2` asset, dequantised to float32); `--model DIR` takes any HF Llama-family folder instead.
The search and loss_memory sections need no model.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("store", "extraction", "postforward", "step", "search", "loss_memory")
STORE_VOCABS = (49_152, 151_936)  # SmolLM2, Qwen2
# (seq_len L, stored positions P) of the store layouts reported
STORE_LAYOUTS = {
    "multiple_choice": (96, 1),  # one answer position per example (what a store v2 keeps)
    "multiple_choice_all_positions": (96, 96),  # every position stored (the old layout)
    "text_responses": (512, 256),  # instruction data: half of each row is the response
    "text_all_positions": (512, 512),
}
HEADLINE_STORE = (151_936, "text_responses")

# A plain English paragraph, used when the botchan text asset cannot be fetched.
EMBEDDED_TEXT = (
    "The river runs slowly past the old mill, where the miller's family has lived for more than "
    "a hundred years. In the spring the water rises and covers the lower fields, and the children "
    "walk along the bank to watch the boats that carry timber down to the town. Their father "
    "keeps a small book in which he writes the height of the water every morning, the weather, "
    "and the names of the boats that pass. Nobody has ever asked to read it, but he says that one "
    "day somebody will want to know how the river behaved in the years before the new bridge was "
    "built. In the evening the family eats together in the kitchen. The mother talks about the "
    "prices at the market, the eldest son about the horses, and the youngest daughter, who is "
    "learning to read, spells out the words on the labels of the jars on the shelf. When the "
    "lamps are lit the house feels smaller and warmer, and the sound of the wheel turning in the "
    "dark becomes part of the silence. In winter the river freezes at the edges, the mill stops, "
    "and the miller repairs the wooden teeth of the great gear, one by one, with tools that his "
    "grandfather made. He works slowly and carefully, because a single broken tooth can stop the "
    "whole machine, and he knows that the spring will come whether or not he is ready for it.")


@dataclasses.dataclass
class Settings:
  mode: str  # quick | full
  batch: int  # B of the extraction, post-forward and step batches
  length: int  # L
  warmup: int  # untimed calls of each function before the repetitions
  reps: int  # timed, interleaved repetitions
  mass_batches: int  # [B, L] text batches for the top-k mass share
  peak_n: int  # size of the [n, n] f32 matmul that measures the peak
  search_events: int  # events of the ECE temperature search
  search_temps: int  # temperatures of its grid
  loss_positions: int  # B*L of the loss-memory section
  loss_vocab: int = 151_936  # V of the loss-memory section
  loss_vocab_chunk: int = 8192  # losses.topk_kd(vocab_chunk=...) of its chunked variant
  loss_rss: bool = True  # peak RSS of a child process per loss (forward+grad)
  search_mode: str = "prob_softmax"  # temperature mode searched (calibrate.mode's default)
  model: str = "smollm2"  # asset name, HF folder or .gguf
  text: str = "botchan"  # botchan | embedded | random
  dtype: str = "float32"  # compute dtype of first_jax (params stay float32) and of PyTorch
  k: int = 5
  mass_k: int = 20  # the mass share is reported for k = 1, 5, 10, mass_k
  lr: float = 1e-5
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  seed: int = 0


MODES = {
    # --quick: under 10 minutes on 2 quiet cores; smaller batch and length than the table
    "quick": dict(batch=4, length=64, warmup=1, reps=3, mass_batches=4, peak_n=2048,
                  search_events=100_000, search_temps=1_000, loss_positions=1_024),
    # --full: the shapes (real SmolLM2-135M, batch 8 x 128), more repetitions
    "full": dict(batch=8, length=128, warmup=2, reps=7, mass_batches=16, peak_n=4096,
                 search_events=100_000, search_temps=1_000, loss_positions=8_192),
}
INT_OPTIONS = ("batch", "length", "warmup", "reps", "mass_batches", "peak_n", "search_events",
               "search_temps", "loss_positions", "loss_vocab", "loss_vocab_chunk")


def log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- timing


def spread(times_s: list[float]) -> dict[str, Any]:
  t = np.asarray(times_s, np.float64)
  q1, med, q3 = np.percentile(t, [25, 50, 75])
  return {"median_s": float(med), "min_s": float(t.min()), "max_s": float(t.max()),
          "q1_s": float(q1), "q3_s": float(q3), "n": int(t.size),
          "times_s": [float(x) for x in t]}


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, reps: int) -> dict[str, dict]:
  """Warm-up calls of each, then `reps` rounds calling each once; the order flips every round.

  Each function must return only when its work is done (block on JAX arrays inside it).
  The first warm-up call's time (compilation included for jitted code) is kept as `first_s`.
  """
  names = list(fns)
  first: dict[str, float] = {}
  for i in range(warmup):
    for n in names:
      t0 = time.perf_counter()
      fns[n]()
      if i == 0:
        first[n] = time.perf_counter() - t0
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(reps):
    for n in (names if r % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      fns[n]()
      times[n].append(time.perf_counter() - t0)
  return {n: {**spread(times[n]), "first_s": first.get(n)} for n in names}


def check(ok: bool, msg: str) -> None:
  """A section's correctness check (kept under python -O, unlike assert)."""
  if not ok:
    raise AssertionError(msg)


def ratio(slow: float, fast: float) -> float:
  return float(slow / fast) if fast > 0 else float("nan")


# ----------------------------------------------------------------------------- environment


def _cpu() -> dict[str, Any]:
  model, flags = platform.processor() or "unknown", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("unknown", platform.processor()):
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
          if f in flags]
  try:
    available = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    available = os.cpu_count() or 1
  return {"model": model, "logical_cores": os.cpu_count(), "cores_available": available,
          "simd_flags": simd}


def _git() -> dict[str, Any]:
  def git(*args):
    try:
      return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                            check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"commit": git("rev-parse", "HEAD"),
          "dirty": None if status is None else bool(status)}


def _versions() -> dict[str, str | None]:
  from importlib import metadata
  out = {}
  for dist in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "ml_dtypes"):
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out[dist] = None
  out["python"] = platform.python_version()
  return out


def environment() -> dict[str, Any]:
  import jax
  return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "git": _git(), "cpu": _cpu(), "versions": _versions(), "platform": platform.platform(),
          "jax_backend": jax.default_backend(),
          "jax_devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------- model FLOPs


def forward_flops(cfg, batch: int, length: int) -> dict[str, float]:
  """Matmul FLOPs of one forward over [batch, length] tokens (2 per multiply-add).

  Projections and MLP of every layer, the attention scores and weighted sum counted over all
  `length` keys (PaLM's MFU convention; a causal kernel could skip half), the output head at
  every position. Norms, RoPE, softmax and the embedding gather are not counted.
  """
  d, f, h, g, e = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim)
  per_token_layer = 2 * (d * h * e + 2 * d * g * e + h * e * d + 3 * d * f)
  attention = 2 * 2 * length * h * e
  head = 2 * d * cfg.vocab_size
  tokens = batch * length
  layers = cfg.num_layers * (per_token_layer + attention) * tokens
  return {"layers": float(layers), "head": float(head * tokens),
          "total": float(layers + head * tokens)}


# ----------------------------------------------------------------------------- first_jax API


def one_device_mesh():
  """A (data, fsdp, tensor) = (1, 1, 1) mesh on the first device (the benchmarks are
  single-device)."""
  import jax
  from first_jax.runtime import sharding
  return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def apply_fn(module) -> Callable:
  from first_jax import models
  return models.apply_fn(module)


def topk_program(module, params, k: int, mesh) -> tuple[Callable, str]:
  """first_jax's extraction program at all positions, `fn(params, batch) -> {teacher_*}`, and
  the call that built it."""
  from first_jax.engine import infer
  return (infer.topk_program(module, params, k, False, mesh),
          "infer.topk_program(module, params, k, answer_only=False, mesh)")


def compile_train_step(module, params, spec, tx, mesh) -> tuple[Any, Callable, str]:
  """(initial state, jitted step, how): the state and step as training builds them."""
  from first_jax.runtime import sharding
  from first_jax.engine import trainer
  state, fn = trainer.compile_step(module, params, spec, tx, mesh, sharding.batch_sharding(mesh))
  return state, fn, "trainer.compile_step(module, params, spec, tx, mesh, batch_sharding)"


# ----------------------------------------------------------------------------- context


class Context:
  """What the sections share, built on first use: the teacher in first_jax and in transformers
  (from first_jax's own HF export of the same weights), the text tokens, the matmul peak."""

  def __init__(self, s: Settings):
    from bench import baselines_torch
    self.s = s
    self._tmp = tempfile.TemporaryDirectory(prefix="first_jax_bench-")
    self.tmp = self._tmp.name
    self.cores = _cpu()["cores_available"]
    self._old_threads = baselines_torch.set_threads(self.cores)
    self.setup_s: dict[str, float] = {}
    self._cache: dict[str, Any] = {}
    self.mesh = one_device_mesh()

  def close(self) -> None:
    from bench import baselines_torch
    baselines_torch.set_threads(self._old_threads)
    self._cache.clear()
    self._tmp.cleanup()

  def _once(self, key: str, build: Callable[[], Any]) -> Any:
    if key not in self._cache:
      t0 = time.perf_counter()
      self._cache[key] = build()
      self.setup_s[key] = round(time.perf_counter() - t0, 3)
    return self._cache[key]

  def source_path(self) -> str:
    from first_jax.data import assets
    from first_jax import config as config_lib
    m = self.s.model
    return str(assets.fetch(m)) if m in config_lib.MODEL_ASSETS else m

  @property
  def model(self):
    """first_jax's Model (float32 params computing in `s.dtype`, scanned layers), placed on
    the one-device mesh."""
    from first_jax import models

    def build():
      log(f"loading {self.s.model} into first_jax (float32 params, compute dtype "
          f"{self.s.dtype})")
      return models.load_pretrained(self.source_path(), dtype=self.s.dtype,
                                    param_dtype="float32", mesh=self.mesh)
    return self._once("load_first_jax", build)

  @property
  def hf_dir(self) -> str:
    """first_jax's HF export of the teacher (what the PyTorch baselines load)."""
    from first_jax import models

    def build():
      path = os.path.join(self.tmp, "hf_export")
      models.save_pretrained(self.model, path)
      return path
    return self._once("export_hf", build)

  @property
  def torch_model(self):
    from bench import baselines_torch
    return self._once("load_torch", lambda: baselines_torch.load_causal_lm(self.hf_dir))

  @property
  def text_source(self) -> str:
    self.tokens  # noqa: B018 (resolves the source)
    return self._cache["text_source"]

  @property
  def tokens(self) -> np.ndarray:
    """int32 token ids of the text (a long 1-D stream)."""
    def build():
      s, vocab = self.s, self.model.config.vocab_size
      if s.text == "random":
        self._cache["text_source"] = "random ids (seeded)"
        return np.random.default_rng(s.seed).integers(0, vocab, 1 << 16).astype(np.int32)
      from first_jax.data import assets, tokenizer as tokenizer_lib
      tok = tokenizer_lib.load(self.source_path())
      text, source = EMBEDDED_TEXT, "embedded paragraph (bench/run.py), repeated"
      if s.text == "botchan":
        try:
          with open(assets.fetch("botchan"), encoding="utf-8") as f:
            raw = f.read()
          start = raw.find("CHAPTER I")  # past the Project Gutenberg header
          text = raw[start if start >= 0 else 0:]
          source = "botchan (first_jax asset 'botchan': sentencepiece sdist test/botchan.txt)"
        except Exception as e:  # noqa: BLE001 (offline: the embedded paragraph instead)
          log(f"botchan unavailable ({e}); using the embedded paragraph")
      ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int32)
      if ids.size and ids.max() >= vocab:
        raise ValueError(f"tokenizer ids up to {ids.max()} exceed the model's vocab {vocab}")
      self._cache["text_source"] = f"{source}; {ids.size} tokens"
      return ids
    return self._once("tokenize", build)

  def windows(self, first: int, count: int, length: int) -> np.ndarray:
    """[count, length] int32: consecutive non-overlapping windows of the text, from window
    `first` on (wrapping around a short text)."""
    t = self.tokens
    idx = (np.arange(first * length, (first + count) * length) % t.size).reshape(count, length)
    return t[idx]

  def peak(self) -> dict[str, Any]:
    """The matmul rate of this machine at `s.dtype`, measured with jnp.dot (bfloat16 operands
    accumulating in float32, as the model's matmuls) and torch.mm, interleaved."""
    def build():
      import jax
      import jax.numpy as jnp
      from bench import baselines_torch
      n, dt = self.s.peak_n, jnp.dtype(self.s.dtype)
      log(f"matmul peak: {dt} [{n}, {n}] @ [{n}, {n}]")
      ka, kb = jax.random.split(jax.random.key(self.s.seed))
      a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
      b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
      dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
      fns = {"jax": lambda: dot(a, b).block_until_ready(),
             "torch": baselines_torch.matmul(n, self.s.seed, self.s.dtype)}
      t = interleaved(fns, max(1, self.s.warmup), max(3, self.s.reps))
      flops = 2.0 * n ** 3
      rate = {k: flops / v["median_s"] for k, v in t.items()}
      return {"n": n, "dtype": str(dt), "flops": flops, "timings": t,
              "flops_per_s": {k: float(v) for k, v in rate.items()},
              "peak_flops_per_s": float(max(rate.values())),
              "peak_is": "the faster of jnp.dot and torch.mm (median)"}
    return self._once("matmul_peak", build)

  def model_info(self) -> dict[str, Any]:
    import jax
    cfg = self.model.config
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.model.params))
    return {"source": self.s.model, "config": {k: v for k, v in cfg.to_dict().items()},
            "params": n}


# ----------------------------------------------------------------------------- sections


def store_arithmetic(k: int = 5, vocabs=STORE_VOCABS, layouts=None) -> dict[str, Any]:
  """Store sizes from first_jax.data.store's own StoreSpec (no data needed)."""
  from first_jax.data import store
  layouts = layouts or STORE_LAYOUTS
  out = {}
  for v in vocabs:
    per = {}
    for name, (length, positions) in layouts.items():
      spec = store.StoreSpec(k=k, vocab_size=v, seq_len=length, positions=positions)
      per[name] = {"seq_len": length, "positions": positions, "id_bits": spec.id_bits,
                   "layout": {f: list(x) for f, x in spec.layout.items()},
                   "bytes_per_example": store.bytes_per_example(spec),
                   "bytes_per_scored_token": store.bytes_per_scored_token(spec)}
    out[str(v)] = {"layouts": per, "dense_bf16_bytes_per_position": 2 * v}
  return out


def _mass_share(ctx: Context, s: Settings) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """Top-k over `mass_batches` text batches with first_jax's extraction program (k = mass_k).

  Returns (the share summary, the top-`s.k` ids [N, L, k], their log-probs [N, L, k]).
  """
  import jax
  from first_jax.runtime import sharding
  params, module = ctx.model.params, ctx.model.module
  fn, _ = topk_program(module, params, s.mass_k, ctx.mesh)
  lps, ids = [], []
  mask = np.ones((s.batch, s.length), np.int32)
  for i in range(s.mass_batches):
    x = ctx.windows(i * s.batch, s.batch, s.length)
    dev = jax.device_put({"input_ids": x, "attention_mask": mask},
                         sharding.batch_sharding(ctx.mesh))
    out = jax.device_get(fn(params, dev))
    lps.append(np.asarray(out["teacher_logprobs"], np.float32))
    ids.append(np.asarray(out["teacher_ids"]))
  lp, ids = np.concatenate(lps), np.concatenate(ids)
  mass = np.cumsum(np.exp(lp.astype(np.float64)), axis=-1)  # [N, L, mass_k]
  share = {}
  for kk in sorted({1, s.k, 10, s.mass_k}):
    if kk > s.mass_k:
      continue
    m = mass[..., kk - 1].reshape(-1)
    share[str(kk)] = {"mean": float(m.mean()), "median": float(np.median(m)),
                      "p10": float(np.percentile(m, 10)), "p25": float(np.percentile(m, 25)),
                      "p90": float(np.percentile(m, 90)), "min": float(m.min())}
  return {"positions": int(lp.shape[0] * lp.shape[1]), "windows": int(lp.shape[0]),
          "window_length": s.length, "text": ctx.text_source,
          "how": "teacher top-k log-probs (full-vocabulary normalised) at every position of "
                 "consecutive text windows, no BOS; share = sum of the top-k probabilities",
          "share_by_k": share}, ids[..., :s.k], lp[..., :s.k]


def section_store(ctx: Context, s: Settings) -> dict[str, Any]:
  from bench import baselines_torch
  out: dict[str, Any] = {"k": s.k, "by_vocab": store_arithmetic(s.k)}
  log("store: top-k mass share on text")
  mass, real_ids, real_lp = _mass_share(ctx, s)
  out["topk_mass_share"] = mass
  n_pos = real_lp.shape[0] * real_lp.shape[1]
  rng = np.random.default_rng(s.seed)
  teacher_v = ctx.model.config.vocab_size
  for v in STORE_VOCABS:
    entry = out["by_vocab"][str(v)]
    uniform_ids = rng.integers(0, v, real_ids.shape)
    jsonl = {"uniform_ids": baselines_torch.jsonl_bytes(uniform_ids, real_lp) / n_pos}
    if v == teacher_v:
      jsonl["teacher_ids"] = baselines_torch.jsonl_bytes(real_ids, real_lp) / n_pos
    entry["reference_jsonl_bytes_per_position"] = jsonl
    entry["reference_jsonl_how"] = (
        f"json.dumps of one list of {{token_id: logprob}} dicts per example row, values the "
        f"teacher's real top-{s.k} log-probs as Python floats of float32 (.item()), ids "
        "uniform over V ('uniform_ids') or the teacher's own ('teacher_ids', when its V is this "
        f"one); {n_pos} positions")
    text = entry["layouts"]["text_responses"]["bytes_per_scored_token"]
    full = entry["layouts"]["text_all_positions"]["bytes_per_scored_token"]
    worst_jsonl = min(jsonl.values())  # the smaller JSONL: the ratio is not overstated
    entry["store_vs_reference_jsonl"] = {"text_responses": ratio(worst_jsonl, text),
                                         "text_all_positions": ratio(worst_jsonl, full)}
    entry["store_vs_dense_bf16"] = {"text_responses": ratio(2 * v, text),
                                    "text_all_positions": ratio(2 * v, full)}
    mc = entry["layouts"]["multiple_choice"]["bytes_per_example"]
    mc_all = entry["layouts"]["multiple_choice_all_positions"]["bytes_per_example"]
    entry["multiple_choice_bytes_per_example"] = {"scored_only": mc, "all_positions": mc_all,
                                                  "ratio": ratio(mc_all, mc)}
  v, layout = HEADLINE_STORE
  out["headline"] = {"vocab": v, "layout": layout,
                     **{k: out["by_vocab"][str(v)]["layouts"][layout][k]
                        for k in ("seq_len", "positions", "bytes_per_scored_token")}}
  return out


def section_extraction(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  import torch
  from bench import baselines_torch
  from first_jax.runtime import sharding
  b, l, k = s.batch, s.length, s.k
  ids = ctx.windows(0, b, l)
  mask = np.ones((b, l), np.int32)
  frozen = ctx.model.for_inference()  # as extract.run: kernels cast to the compute dtype once
  params = frozen.params
  fn, how = topk_program(frozen.module, params, k, ctx.mesh)
  batch_sh = sharding.batch_sharding(ctx.mesh)
  tmodel = ctx.torch_model
  ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

  def first_jax():  # as extract.run_topk: host batch -> device, program, top-k back to host
    dev = jax.device_put({"input_ids": ids, "attention_mask": mask}, batch_sh)
    return jax.device_get(fn(params, dev))

  def torch_fn():
    return baselines_torch.extract(tmodel, ids_t, mask_t, k, s.dtype)

  log(f"extraction: [{b}, {l}], warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax": first_jax, "torch": torch_fn}, s.warmup, s.reps)
  a, r = first_jax(), torch_fn()
  same = a["teacher_ids"] == r["ids"]
  agree = {"top1_same_id": float(same[..., 0].mean()), "topk_same_ids": float(same.mean()),
           "max_abs_logprob_diff_where_same": float(
               np.abs(a["teacher_logprobs"] - r["logprobs"])[same].max()) if same.any() else None,
           "max_abs_tail_diff": float(np.abs(a["teacher_tail"] - r["tail"]).max())}
  flops = forward_flops(ctx.model.config, b, l)
  tokens = b * l
  out = {"shapes": {"input_ids": [b, l], "logits": [b, l, ctx.model.config.vocab_size],
                    "topk": [b, l, k]},
         "what": {"first_jax": f"{how}: forward + topk.extract in one jitted program; "
                               "device_put in, device_get out",
                  "torch": "transformers AutoModelForCausalLM (first_jax's HF export), "
                           "torch.no_grad(), logits -> log_softmax -> batched torch.topk -> tail"},
         "torch_attn_implementation": baselines_torch.attn_implementation(tmodel),
         "timings": t,
         "tokens_per_s": {n: tokens / v["median_s"] for n, v in t.items()},
         "speedup_vs_torch": ratio(t["torch"]["median_s"], t["first_jax"]["median_s"]),
         "forward_flops": flops, "agreement": agree}
  peak = ctx.peak()["peak_flops_per_s"]
  out["mfu"] = {n: flops["total"] / v["median_s"] / peak for n, v in t.items()}
  return out


def section_postforward(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  import torch
  from bench import baselines_torch
  from first_jax.core import step
  from first_jax.data import store
  b, l, k = s.batch, s.length, s.k
  v = ctx.model.config.vocab_size
  ids = ctx.windows(0, b, l)
  logits = baselines_torch.logits(ctx.torch_model, ids, np.ones((b, l), np.int32))
  logits_dev = jax.block_until_ready(jax.device_put(logits))  # "given logits": on the device
  logits_t = torch.from_numpy(logits)
  topk = jax.jit(functools.partial(step.teacher_topk, k=k))
  folder = os.path.join(ctx.tmp, "postforward_store")
  spec = store.StoreSpec(k=k, vocab_size=v, seq_len=l, positions=l)  # every position scored
  writer = store.StoreWriter(folder, spec)
  example_idx, scored = np.arange(b), np.ones((b, l), bool)
  jsonl_path = os.path.join(ctx.tmp, "reference.jsonl")
  held: dict[str, Any] = {}

  def top_only():
    held["top"] = jax.device_get(topk(logits_dev))

  def write_only():
    top = held["top"]
    writer.write_shard(0, example_idx, ids, top["teacher_ids"], top["teacher_logprobs"],
                       top["teacher_tail"], scored)

  def first_jax():
    top_only()
    write_only()

  def reference():
    baselines_torch.reference_postforward(logits_t, k, jsonl_path)

  # where the top-k program's time goes on this backend: XLA's top_k alone, and one reduction
  # pass over the logits with an exp per element (what the tail/normaliser pass does) against
  # one with a multiply-add per element
  import jax.numpy as jnp
  parts = {"xla_top_k": jax.jit(lambda x: jax.lax.top_k(x, k)),
           "xla_exp_sum_pass": jax.jit(lambda x: jnp.sum(jnp.exp(x - x[..., :1]), -1)),
           "xla_mul_sum_pass": jax.jit(lambda x: jnp.sum(x * x, -1))}
  part_fns = {n: functools.partial(lambda f: jax.block_until_ready(f(logits_dev)), f)
              for n, f in parts.items()}
  log(f"postforward: logits [{b}, {l}, {v}], warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax": first_jax, "reference": reference,
                   "first_jax_topk_only": top_only, "first_jax_write_only": write_only,
                   **part_fns}, s.warmup, s.reps)
  written = {"first_jax_store": store.store_size_bytes(folder),
             "reference_jsonl": os.path.getsize(jsonl_path)}
  return {"shapes": {"logits": [b, l, v], "topk": [b, l, k], "store_positions": l},
          "what": {"first_jax": "jit(step.teacher_topk) on device logits -> device_get -> "
                                "StoreWriter.write_shard (bit packing, float16, sha256, "
                                "atomic shard + manifest)",
                   "reference": "torch.log_softmax over V, batched torch.topk, Python loop over "
                                "positions building {id: logprob} dicts with .item(), "
                                "json.dumps per example row to a JSONL file",
                   "first_jax_topk_only / first_jax_write_only": "the two halves of first_jax",
                   "xla_*": "parts: lax.top_k alone; one reduction over the logits with an exp "
                            "per element; one with a multiply-add per element"},
          "timings": t,
          "positions_per_s": {n: b * l / x["median_s"] for n, x in t.items()},
          "speedup_vs_reference": ratio(t["reference"]["median_s"], t["first_jax"]["median_s"]),
          "bytes_written": written,
          "bytes_per_position": {n: x / (b * l) for n, x in written.items()}}


def step_inputs(ctx: Context, s: Settings) -> tuple[dict[str, np.ndarray], dict, Any]:
  """The [B, L] cross-entropy batch of text windows, the AdamW settings, and first_jax's
  optimizer as trainer.train_model builds it (constant lr: no warmup, a long decay)."""
  from first_jax.core import step
  b, l = s.batch, s.length
  w = ctx.windows(0, b, l + 1)  # L + 1 tokens: inputs and their next tokens
  batch = {"input_ids": w[:, :-1].copy(), "attention_mask": np.ones((b, l), np.int32),
           "targets": w[:, 1:].copy(), "loss_mask": np.ones((b, l), np.float32)}
  opt = dict(lr=s.lr, weight_decay=s.weight_decay, clip_norm=s.clip_norm, b1=s.b1, b2=s.b2,
             eps=s.eps)
  return batch, opt, step.make_optimizer(total_steps=1_000_000, warmup_ratio=0.0, **opt)


def params_copy(ctx: Context) -> Any:
  """A copy of the ctx's params in the same layout (a step donates its state)."""
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda x: jax.device_put(jnp.copy(x), x.sharding), ctx.model.params)


def section_step(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  import torch
  from bench import baselines_torch
  from first_jax import models
  from first_jax.runtime import sharding
  from first_jax.core import step
  b, l = s.batch, s.length
  peak = ctx.peak()  # before the big allocations
  batch, opt, tx = step_inputs(ctx, s)
  params = params_copy(ctx)  # the state is donated
  state, step_fn, how = compile_train_step(ctx.model.module, params, step.LossSpec(kind="ce"),
                                           tx, ctx.mesh)
  del params
  batch_sh = sharding.batch_sharding(ctx.mesh)
  holder: dict[str, Any] = {"state": state, "loss": []}
  del state

  def first_jax():  # as trainer.fit: put_batch (device_put over the batch sharding), step
    st, metrics = step_fn(holder["state"], jax.device_put(batch, batch_sh), None)
    holder["state"] = jax.block_until_ready(st)
    if len(holder["loss"]) < 1:
      total, count = jax.device_get(metrics["loss"])
      holder["loss"].append(float(total / max(count, 1.0)))

  # PyTorch: its own copy of the same export (the step changes the weights)
  tmodel = baselines_torch.load_causal_lm(ctx.hf_dir, train=True)
  tstep = baselines_torch.TrainStep(tmodel, **opt, dtype=s.dtype)
  tb = {k: torch.from_numpy(v.astype(np.float32 if k == "loss_mask" else np.int64))
        for k, v in batch.items()}
  tloss: list[float] = []

  def torch_fn():
    loss = tstep(tb["input_ids"], tb["attention_mask"], tb["targets"], tb["loss_mask"])
    if not tloss:
      tloss.append(loss)

  # the same step compiled without the CPU options of `xla_options` (what they bring)
  plain_fn = jax.jit(functools.partial(step.train_step, student_apply=models.apply_fn(
      ctx.model.module), teacher_apply=None, spec=step.LossSpec(kind="ce"), tx=tx),
      donate_argnums=0)
  plain_holder = {"state": step.init_state(params_copy(ctx), tx)}

  def first_jax_xla_default():
    st, metrics = plain_fn(plain_holder["state"], jax.device_put(batch, batch_sh), None)
    plain_holder["state"] = jax.block_until_ready(st)
    if "loss" not in plain_holder:
      total, count = jax.device_get(metrics["loss"])
      plain_holder["loss"] = float(total / max(count, 1.0))

  log(f"step: [{b}, {l}], warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax": first_jax, "torch": torch_fn,
                   "first_jax_xla_default": first_jax_xla_default}, s.warmup, s.reps)
  fwd = forward_flops(ctx.model.config, b, l)
  train_flops = 3.0 * fwd["total"]  # backward = 2 x forward
  out = {"shapes": {"input_ids": [b, l], "logits": [b, l, ctx.model.config.vocab_size]},
         "what": {"first_jax": f"{how}, spec=LossSpec(kind='ce'), tx=step.make_optimizer"
                               "(...); device_put of the batch included",
                  "torch": "transformers model.train(), zero_grad, forward, masked token-mean "
                           "cross-entropy, backward, clip_grad_norm_, torch.optim.AdamW.step",
                  "first_jax_xla_default": "the same step.train_step, jax.jit with donation "
                                           "and no compiler_options (XLA's defaults), its own "
                                           "copy of the state"},
         "optimizer": opt, "torch_attn_implementation": baselines_torch.attn_implementation(tmodel),
         "loss_at_first_step": {"first_jax": holder["loss"][0] if holder["loss"] else None,
                                "torch": tloss[0] if tloss else None,
                                "first_jax_xla_default": plain_holder.get("loss")},
         "timings": t,
         "tokens_per_s": {n: b * l / v["median_s"] for n, v in t.items()},
         "speedup_vs_torch": ratio(t["torch"]["median_s"], t["first_jax"]["median_s"]),
         "speedup_from_xla_options": ratio(t["first_jax_xla_default"]["median_s"],
                                           t["first_jax"]["median_s"]),
         "train_flops_per_step": train_flops,
         "flops_convention": "3 x forward matmul FLOPs (bench.run.forward_flops)",
         "peak_flops_per_s": peak["peak_flops_per_s"],
         "mfu": {n: train_flops / v["median_s"] / peak["peak_flops_per_s"]
                 for n, v in t.items()}}
  holder.clear()
  plain_holder.clear()
  del tstep, tmodel
  gc.collect()
  out["kd"] = _kd_step(ctx, s, batch, tx, opt)
  kd_median = out["kd"]["timings"]["first_jax_kd"]["median_s"]
  out["tokens_per_s"]["first_jax_kd"] = b * l / kd_median
  out["mfu"]["first_jax_kd"] = train_flops / kd_median / peak["peak_flops_per_s"]
  out["kd"]["time_vs_ce"] = ratio(kd_median, t["first_jax"]["median_s"])
  return out


def _kd_step(ctx: Context, s: Settings, batch: dict[str, np.ndarray], tx,
             opt: dict[str, float]) -> dict[str, Any]:
  """first_jax's offline top-k KD step (FIRST's distill stage with stored targets), timed on
  its own after the ce-vs-torch comparison: the teacher's top-k of the batch (first_jax's
  extraction program on the same model) in the batch keys the store fills."""
  import jax
  from first_jax.runtime import sharding
  from first_jax.core import step
  b, l = batch["input_ids"].shape
  batch_sh = sharding.batch_sharding(ctx.mesh)
  fn, _ = topk_program(ctx.model.module, ctx.model.params, s.k, ctx.mesh)
  top = jax.device_get(fn(ctx.model.params, jax.device_put(
      {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch_sh)))
  kd_batch = {**batch, "teacher_ids": np.asarray(top["teacher_ids"], np.int32),
              "teacher_logprobs": np.asarray(top["teacher_logprobs"], np.float32),
              "teacher_tail": np.asarray(top["teacher_tail"], np.float32)}
  # as train.parse_variant builds "first" with the default distill config, offline
  spec = step.LossSpec(kind="topk_kd", k=s.k, tail="bucket", direction="forward",
                       temperature_mode="prob_softmax", num_bins=10)
  params = params_copy(ctx)
  state, step_fn, how = compile_train_step(ctx.model.module, params, spec, tx, ctx.mesh)
  del params
  holder: dict[str, Any] = {"state": state, "loss": []}
  del state

  def first_jax_kd():
    st, metrics = step_fn(holder["state"], jax.device_put(kd_batch, batch_sh), None)
    holder["state"] = jax.block_until_ready(st)
    if not holder["loss"]:
      total, count = jax.device_get(metrics["loss"])
      holder["loss"].append(float(total / max(count, 1.0)))

  log(f"step (offline top-k KD): [{b}, {l}], k={s.k}, warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax_kd": first_jax_kd}, s.warmup, s.reps)
  out = {"what": f"{how}, spec=LossSpec(kind='topk_kd', tail='bucket', direction='forward', "
                 "temperature_mode='prob_softmax'), initial temperature 1; batch keys "
                 "teacher_ids / teacher_logprobs / teacher_tail (the teacher's top-k of the "
                 "batch, as the store gives them); device_put of the batch included; timed after "
                 "the ce-vs-torch repetitions, not interleaved with them; no torch baseline",
         "spec": dataclasses.asdict(spec), "optimizer": opt,
         "shapes": {"input_ids": [b, l], "teacher_topk": [b, l, s.k]},
         "loss_at_first_step": holder["loss"][0] if holder["loss"] else None,
         "timings": t}
  holder.clear()
  gc.collect()
  return out


# ----------------------------------------------------------------------------- search


def synthetic_events(n: int, k: int, vocab: int, seed: int,
                     candidates: int = 64) -> dict[str, np.ndarray]:
  """n seeded teacher events as the calibrate stage reads them from the store: top-k log-probs
  (descending), their ids (distinct), the tail log-mass and the gold token.

  Each event's distribution is a softmax over `candidates` Gaussian logits with a per-event
  scale (lognormal: top-1 probabilities from ~0.1 to ~1); the top-1 is correct with probability
  p1 ** 1.5 (an over-confident teacher, as the paper finds), else the gold is another id.
  """
  rng = np.random.default_rng(seed)
  scale_N = rng.lognormal(1.0, 0.5, n)
  z_NxC = rng.standard_normal((n, candidates)) * scale_N[:, None]
  z_NxC -= z_NxC.max(-1, keepdims=True)
  p_NxC = np.exp(z_NxC)
  p_NxC /= p_NxC.sum(-1, keepdims=True)
  p_NxC = -np.sort(-p_NxC, axis=-1)
  logprobs_NxK = np.log(p_NxC[:, :k]).astype(np.float32)
  tail_N = np.log(np.maximum(p_NxC[:, k:].sum(-1), 1e-30)).astype(np.float32)
  first_N = rng.integers(0, vocab, n)
  ids_NxK = ((first_N[:, None] + np.arange(k) * max(1, vocab // k)) % vocab).astype(np.int32)
  correct_N = rng.random(n) < p_NxC[:, 0] ** 1.5
  other_N = (first_N + 1 + rng.integers(0, vocab - 1, n)) % vocab  # never the top-1 id
  targets_N = np.where(correct_N, first_N, other_N).astype(np.int32)
  return {"logprobs": logprobs_NxK, "ids": ids_NxK, "tail": tail_N, "targets": targets_N}


def numpy_ece_curve(logprobs_NxK: np.ndarray, ids_NxK: np.ndarray, targets_N: np.ndarray,
                    tail_N: np.ndarray | None, grid_T: np.ndarray, mode: str,
                    num_bins: int = 10) -> np.ndarray:
  """The baseline: the ECE of every temperature with NumPy, as a user would write the search.

  A Python loop over the temperatures, each vectorised over the events: re-scale the top-k
  (+ tail bin) as `first_jax.core.temperature.rescale` defines it (prob_softmax: softmax(p / t);
  log_space: softmax(log p / t)), confidence = the re-scaled top-1, correct = top-1 id == gold,
  10 equal-width bins (m/10, (m+1)/10] (first_jax.core.calibration), ECE = sum |conf - acc| W_m / W.
  The bins axis is put first once ([K + 1, N]): NumPy's reductions over a short last axis are
  several times slower, and the baseline should not be handicapped by its layout.
  """
  from first_jax.core.topk import TAIL_FLOOR
  lp_BxN = np.asarray(logprobs_NxK, np.float32).T
  if tail_N is not None:
    lp_BxN = np.concatenate([lp_BxN, np.asarray(tail_N, np.float32)[None, :]], 0)
  lp_BxN = np.ascontiguousarray(np.maximum(lp_BxN, np.float32(TAIL_FLOOR)))
  base_BxN = np.exp(lp_BxN) if mode == "prob_softmax" else lp_BxN
  correct_N = (ids_NxK[:, 0] == targets_N).astype(np.float64)
  edges = (np.arange(1, num_bins) / num_bins).astype(np.float32)
  ece_T = np.empty(len(grid_T), np.float64)
  for i, t in enumerate(np.asarray(grid_T, np.float32)):
    z_BxN = base_BxN / t
    z_BxN -= z_BxN.max(0)
    conf_N = np.exp(z_BxN[0] - np.log(np.exp(z_BxN).sum(0)))
    bin_N = np.searchsorted(edges, conf_N, side="left")
    conf_sum = np.bincount(bin_N, conf_N, num_bins)
    corr_sum = np.bincount(bin_N, correct_N, num_bins)
    ece_T[i] = np.abs(conf_sum - corr_sum).sum() / max(len(conf_N), 1)
  return ece_T


def section_search(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  from first_jax.core import temperature
  from first_jax.runtime import xla_options
  n, nt, mode, nb = s.search_events, s.search_temps, s.search_mode, 10
  ev = synthetic_events(n, s.k, STORE_VOCABS[-1], s.seed)
  coarse = temperature.default_grid(mode)
  grid_T = np.geomspace(coarse[0], coarse[-1], nt).astype(np.float32)
  search = jax.jit(lambda lp, ids, tg, tail, grid: temperature.search(
      lp, ids, tg, mode=mode, num_bins=nb, refine=False, grid=grid, tail_logmass_N=tail),
      compiler_options=xla_options.fused_dots(jax.devices()[0].platform))  # as calibrate
  dev = jax.block_until_ready(jax.device_put(
      (ev["logprobs"], ev["ids"], ev["targets"], ev["tail"], grid_T)))
  held: dict[str, Any] = {}

  def first_jax():  # the compiled search; its curve and best temperature back on the host
    res = search(*dev)
    held["jax"] = jax.device_get((res.ece_T, res.best_t))

  def numpy_fn():
    ece_T = numpy_ece_curve(ev["logprobs"], ev["ids"], ev["targets"], ev["tail"], grid_T, mode,
                            nb)
    held["numpy"] = (ece_T, grid_T[int(np.argmin(ece_T))])

  log(f"search: {nt} temperatures x {n} events ({mode}), warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax": first_jax, "numpy": numpy_fn}, s.warmup, s.reps)
  (jax_ece, jax_t), (np_ece, np_t) = held["jax"], held["numpy"]
  jax_ece = np.asarray(jax_ece, np.float64)
  i_jax, i_np = int(np.argmin(jax_ece)), int(np.argmin(np_ece))
  # float32 vs NumPy rounding may move a confidence across a bin edge: at most 2 / N each
  atol = 1e-5 + 4.0 / n
  diff = float(np.abs(jax_ece - np_ece).max())
  check(np.allclose(jax_ece, np_ece, rtol=0, atol=atol),
        f"search: ECE curves differ by up to {diff:.3g} (atol {atol:.3g})")
  check(float(jax_t) == float(grid_T[i_jax]), "search: best_t is not the curve's argmin")
  tie = abs(jax_ece[i_np] - jax_ece[i_jax]) <= atol and abs(np_ece[i_np] - np_ece[i_jax]) <= atol
  check(i_jax == i_np or tie, f"search: best t {float(jax_t)} (first_jax) vs {float(np_t)} "
                               "(numpy), not a tie")
  return {"shapes": {"events": n, "temperatures": nt, "k": s.k, "num_bins": nb},
          "mode": mode, "tail": "bucket (tail log-mass as one more bin)",
          "grid": {"first": float(grid_T[0]), "last": float(grid_T[-1]),
                   "spacing": "geometric (the range of temperature.default_grid(mode))"},
          "events": "bench.run.synthetic_events (seeded): top-5 of a softmax over 64 Gaussian "
                    "logits with a lognormal per-event scale + tail; top-1 correct with "
                    "probability p1 ** 1.5",
          "what": {"first_jax": "jax.jit(temperature.search(..., refine=False, grid, "
                                "tail_logmass_N), compiler_options=xla_options.fused_dots) "
                                "on device arrays, as calibrate compiles it: every "
                                "temperature in one lax.scan (ECE + binary NLL + Brier "
                                "each); compiled in the warm-up call; curve and best t "
                                "device_get",
                   "numpy": "bench.run.numpy_ece_curve: Python loop over temperatures, NumPy "
                            "over events in a bins-first [k + 1, N] layout (ECE only: "
                            "first_jax's work is a superset)"},
          "timings": t,
          "speedup_vs_numpy": ratio(t["numpy"]["median_s"], t["first_jax"]["median_s"]),
          "temperatures_per_s": {n_: nt / v["median_s"] for n_, v in t.items()},
          "agreement": {"max_abs_ece_diff": diff, "atol": atol,
                        "best_t": {"first_jax": float(jax_t), "numpy": float(np_t)},
                        "best_t_equal": i_jax == i_np,
                        "best_ece": float(jax_ece[i_jax])}}


# ----------------------------------------------------------------------------- loss memory


def naive_topk_kd(logits_NxV, ids_NxK, logprobs_NxK, tail_N, mask_N):
  """The baseline: the same loss as losses.topk_kd (forward KL, tail bucket) written the plain
  way: log_softmax over the full vocabulary, take_along_axis at the k teacher ids, KL over the
  k + 1 bins. Returns (loss_sum, weight_sum)."""
  import jax
  import jax.numpy as jnp
  s_lp_NxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
  q_NxK = jnp.take_along_axis(s_lp_NxV, ids_NxK, axis=-1)
  q_tail_N = jnp.log1p(-jnp.sum(jnp.exp(q_NxK), axis=-1))
  p_NxB = jnp.concatenate([logprobs_NxK, tail_N[:, None]], -1)
  q_NxB = jnp.concatenate([q_NxK, q_tail_N[:, None]], -1)
  kl_N = jnp.sum(jnp.exp(p_NxB) * (p_NxB - q_NxB), axis=-1)
  return jnp.sum(kl_N * mask_N), jnp.sum(mask_N)


def _loss_variants(chunk: int) -> dict[str, Callable]:
  """(logits [N, V], ids [N, K], logprobs [N, K], tail [N], mask [N]) -> (sum, count)."""
  from first_jax.core import losses

  def first_jax(vocab_chunk):
    return lambda x, ids, lp, tail, m: losses.topk_kd(
        x, ids, lp, m, tail="bucket", teacher_tail_logmass_BxL=tail, vocab_chunk=vocab_chunk)
  return {"chunked": first_jax(chunk), "fused": first_jax(None), "naive": naive_topk_kd}


def _loss_programs(fn: Callable) -> dict[str, Callable]:
  import jax
  return {"forward": fn,
          "forward_grad": jax.value_and_grad(lambda x, *a: fn(x, *a)[0])}


def _loss_shapes(n: int, v: int, k: int) -> tuple:
  import jax
  import jax.numpy as jnp
  sds = jax.ShapeDtypeStruct
  return (sds((n, v), jnp.float32), sds((n, k), jnp.int32), sds((n, k), jnp.float32),
          sds((n,), jnp.float32), sds((n,), jnp.float32))


def _loss_inputs(n: int, v: int, k: int):
  """Deterministic loss inputs made on the device (the logits by one fused elementwise program:
  no temporaries of their own)."""
  import jax
  import jax.numpy as jnp
  logits = jax.jit(lambda: 4.0 * jnp.sin(
      0.37 * jax.lax.broadcasted_iota(jnp.float32, (n, v), 1)
      + 1.3 * jax.lax.broadcasted_iota(jnp.float32, (n, v), 0)))()
  row = np.arange(n)[:, None]
  ids = ((row * 131 + np.arange(k) * max(1, v // k)) % v).astype(np.int32)
  p = np.linspace(0.5, 0.05, k)
  p = p / p.sum() * 0.9
  lp = np.broadcast_to(np.log(p).astype(np.float32), (n, k)).copy()
  tail = np.full((n,), np.log(0.1), np.float32)
  return jax.block_until_ready((logits, *jax.device_put((ids, lp, tail,
                                                          np.ones((n,), np.float32)))))


def loss_rss_child(arg: str) -> None:
  """Child process of the loss_memory section: compile one loss's forward+grad, make its inputs,
  run it once, print the resident-set figures (bytes) as one JSON line."""
  import resource
  import jax
  a = json.loads(arg)
  fn = _loss_programs(_loss_variants(a["chunk"])[a["variant"]])["forward_grad"]
  compiled = jax.jit(fn).lower(*_loss_shapes(a["n"], a["v"], a["k"])).compile()
  maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  after_compile = maxrss()
  inputs = _loss_inputs(a["n"], a["v"], a["k"])
  with open("/proc/self/statm") as f:
    rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  before = maxrss()
  jax.block_until_ready(compiled(*inputs))
  after = maxrss()
  with open("/proc/self/status") as f:  # the kernel's own peak of this process, as a check
    hwm = [int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:")]
  print(json.dumps({"maxrss_after_compile": after_compile, "maxrss_with_inputs": before,
                    "rss_before_run": rss_now, "maxrss_after_run": after,
                    "vmhwm_after_run": hwm[0] if hwm else None}))


def _run_loss_child(variant: str, n: int, v: int, k: int, chunk: int) -> dict[str, Any]:
  arg = json.dumps({"variant": variant, "n": n, "v": v, "k": k, "chunk": chunk})
  # Through a shell that forks (not execs) Python: on Linux ru_maxrss survives execve, so a
  # child exec'd straight from this (large) process would report this process's peak.
  cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c",
         "import sys, bench.run as r; r.loss_rss_child(sys.argv[1])", arg]
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  except subprocess.TimeoutExpired:
    return {"error": "timed out after 1800 s"}
  wall = round(time.perf_counter() - t0, 3)
  if p.returncode != 0:  # e.g. killed for memory: reported, the section goes on
    return {"error": f"exit status {p.returncode}: {p.stderr.strip()[-600:]}", "wall_s": wall}
  out = json.loads(p.stdout.strip().splitlines()[-1])
  out["run_peak_above_rss_before_run"] = out["maxrss_after_run"] - out["rss_before_run"]
  out["wall_s"] = wall
  return out


def section_loss_memory(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  from bench import math_memory
  n, v, k, chunk = s.loss_positions, s.loss_vocab, s.k, s.loss_vocab_chunk
  variants = _loss_variants(chunk)
  shapes = _loss_shapes(n, v, k)
  log(f"loss_memory: [{n}, {v}] f32 logits, k={k}, chunk {chunk}: compiled temporaries")
  temp: dict[str, dict[str, int]] = {}
  for name, fn in variants.items():
    temp[name] = {p: int(round(math_memory.temps(prog, *shapes) * 1e6))  # temps() gives MB
                  for p, prog in _loss_programs(fn).items()}
  # same loss: the values and gradients of chunked and naive agree (a few rows, the same V)
  rows = min(n, 8)
  small = _loss_inputs(rows, v, k)
  got = {name: jax.device_get(jax.jit(_loss_programs(variants[name])["forward_grad"])(*small))
         for name in ("chunked", "naive")}
  (lc, grad_c), (ln, grad_n) = got["chunked"], got["naive"]
  agree = {"rows": rows, "loss": {"chunked": float(lc), "naive": float(ln)},
           "max_abs_grad_diff": float(np.abs(grad_c - grad_n).max())}
  check(np.allclose(lc, ln, rtol=1e-4, atol=1e-5), f"loss_memory: losses differ {agree}")
  check(np.allclose(grad_c, grad_n, rtol=1e-4, atol=1e-6),
        f"loss_memory: gradients differ {agree}")
  del small, got
  logits_bytes = n * v * 4
  out: dict[str, Any] = {
      "shapes": {"logits": [n, v], "teacher_topk": [n, k], "B*L": n, "vocab_chunk": chunk},
      "positions_note": ("B*L = 8,192 as the issue asks" if n == 8192 else
                         f"B*L = {n}, not the issue's 8,192 ({s.mode} mode or --loss-positions)"),
      "what": {"chunked": f"losses.topk_kd(tail='bucket', vocab_chunk={chunk}): online "
                          "log-sum-exp over vocab chunks, gather at the k ids",
               "fused": "losses.topk_kd(tail='bucket', vocab_chunk=None), as step.kd_loss_parts "
                        "calls it: one fused log-sum-exp pass",
               "naive": "bench.run.naive_topk_kd: jax.nn.log_softmax over V, take_along_axis "
                        "at the k ids, KL over k + 1 bins (same value, asserted)"},
      "how": "jax.jit(fn).lower(abstract shapes).compile().memory_analysis()"
             ".temp_size_in_bytes (bench.math_memory.temps); forward = the loss, forward_grad "
             "= jax.value_and_grad over the logits (the [B*L, V] gradient is an output)",
      "backend": jax.default_backend(),
      "logits_input_bytes": logits_bytes,
      "temp_bytes": temp,
      "temp_in_logits_copies": {nm: {p: x / logits_bytes for p, x in d.items()}
                                for nm, d in temp.items()},
      "ratio_vs_naive": {nm: {p: ratio(d[p], temp["naive"][p]) for p in d}
                         for nm, d in temp.items() if nm != "naive"},
      "agreement": agree}
  if s.loss_rss:
    log(f"loss_memory: peak RSS of a child process per loss (forward+grad, [{n}, {v}])")
    out["peak_rss_bytes"] = {nm: _run_loss_child(nm, n, v, k, chunk)
                             for nm in ("chunked", "naive")}
    out["peak_rss_how"] = (
        "one child process per loss (python -c bench.run.loss_rss_child): compile its "
        "forward+grad, make the inputs, run once; ru_maxrss (RUSAGE_SELF) after compiling, with "
        "the inputs made, after the run (VmHWM of /proc/self/status as a check); "
        "run_peak_above_rss_before_run = ru_maxrss after the run - the resident set just "
        "before it. Launched through /bin/sh (fork, then exec) so that ru_maxrss is the "
        "child's own, not inherited from this process across execve")
  out["ratio_fwd_grad_chunked_vs_naive"] = out["ratio_vs_naive"]["chunked"]["forward_grad"]
  return out


SECTION_FNS = {"store": section_store, "extraction": section_extraction,
               "postforward": section_postforward, "step": section_step,
               "search": section_search, "loss_memory": section_loss_memory}


# ----------------------------------------------------------------------------- driver


def run(s: Settings, only: tuple[str, ...] = SECTIONS,
        argv: list[str] | None = None) -> dict[str, Any]:
  t0 = time.perf_counter()
  argv = sys.argv[1:] if argv is None else argv
  result: dict[str, Any] = {
      "benchmark": "first_jax vs PyTorch/transformers and the FIRST reference code (issue 11)",
      "command": " ".join(["python", "-m", "bench.run", *argv]),
      "dtype": s.dtype, "settings": dataclasses.asdict(s), "sections_run": list(only),
      "meta": environment()}
  ctx = Context(s)
  try:
    result["meta"]["torch_threads"] = ctx.cores
    sections: dict[str, Any] = {}
    for name in only:
      ts = time.perf_counter()
      sections[name] = SECTION_FNS[name](ctx, s)
      sections[name]["section_wall_s"] = round(time.perf_counter() - ts, 3)
      log(f"{name}: done in {sections[name]['section_wall_s']:.1f} s")
    if "matmul_peak" in ctx._cache:
      sections["matmul_peak"] = ctx.peak()
    result["sections"] = sections
    result["model"] = ctx.model_info() if "load_first_jax" in ctx._cache else None
    result["text"] = ctx._cache.get("text_source")
    result["setup_s"] = ctx.setup_s
  finally:
    ctx.close()
  sec = result["sections"]
  result["store_bytes_per_token"] = (sec["store"]["headline"]["bytes_per_scored_token"]
                                     if "store" in sec else None)
  result["extraction_speedup_vs_torch"] = sec.get("extraction", {}).get("speedup_vs_torch")
  result["postforward_speedup_vs_reference"] = sec.get("postforward", {}).get(
      "speedup_vs_reference")
  result["step_speedup_vs_torch"] = sec.get("step", {}).get("speedup_vs_torch")
  result["step_mfu"] = sec.get("step", {}).get("mfu", {}).get("first_jax")
  result["step_kd_mfu"] = sec.get("step", {}).get("mfu", {}).get("first_jax_kd")
  result["search_speedup_vs_numpy"] = sec.get("search", {}).get("speedup_vs_numpy")
  result["loss_memory_ratio_vs_naive"] = sec.get("loss_memory", {}).get(
      "ratio_fwd_grad_chunked_vs_naive")
  result["meta"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
  # Another process on the cores: torch's OpenMP barriers then wait for descheduled threads
  # (observed: ~20 ms per parallel region), and every figure of the run is contaminated.
  cores = result["meta"]["cpu"]["cores_available"]
  start = result["meta"]["load_avg_start"]
  result["meta"]["machine_busy_at_start"] = bool(start and start[0] > 0.5 * cores)
  result["meta"]["wall_s"] = round(time.perf_counter() - t0, 3)
  return result


def summary(r: dict[str, Any]) -> str:
  def f(x, fmt):
    return "-" if x is None else format(x, fmt)
  lines = [f"store B/token (V=151,936)     {f(r['store_bytes_per_token'], '.2f')}",
           f"extraction speedup vs torch   {f(r['extraction_speedup_vs_torch'], '.2f')}x",
           f"post-forward vs reference     {f(r['postforward_speedup_vs_reference'], '.1f')}x",
           f"step speedup vs torch         {f(r['step_speedup_vs_torch'], '.2f')}x",
           f"step MFU (first_jax)          {f(r['step_mfu'], '.1%')}",
           f"KD step MFU (first_jax)       {f(r['step_kd_mfu'], '.1%')}",
           f"search speedup vs NumPy       {f(r['search_speedup_vs_numpy'], '.1f')}x",
           f"loss memory vs naive (temps)  {f(r['loss_memory_ratio_vs_naive'], '.3g')}",
           f"wall                          {r['meta']['wall_s']:.0f} s"]
  if r["meta"].get("machine_busy_at_start"):
    lines.append(f"WARNING: load average {r['meta']['load_avg_start'][0]:.1f} on "
                 f"{r['meta']['cpu']['cores_available']} cores at the start: timings contaminated")
  return "\n".join(lines)


def parse(argv: list[str] | None = None) -> tuple[Settings, tuple[str, ...], str | None]:
  ap = argparse.ArgumentParser(prog="python -m bench.run",
                               description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = ap.add_mutually_exclusive_group(required=True)
  mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                    help=f"small shapes, few repetitions (< 10 min on 2 cores): {MODES['quick']}")
  mode.add_argument("--full", action="store_const", const="full", dest="mode",
                    help=f"the issue's shapes, for docs/benchmarks.md: {MODES['full']}")
  ap.add_argument("--out", help="write the JSON here (else it is printed on stdout)")
  ap.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
  ap.add_argument("--model", help="teacher: asset name (smollm2), HF folder or .gguf")
  ap.add_argument("--text", choices=("botchan", "embedded", "random"))
  ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                  help="compute precision of first_jax (params float32) and of the PyTorch "
                       "baselines (bfloat16: torch.autocast); default float32")
  for name in INT_OPTIONS:
    ap.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name,
                    help="override the mode's value")
  ap.add_argument("--no-loss-rss", action="store_true",
                  help="loss_memory: skip the child processes that measure the peak RSS")
  a = ap.parse_args(argv)
  values = dict(MODES[a.mode])
  for name in INT_OPTIONS:
    if getattr(a, name) is not None:
      values[name] = getattr(a, name)
  if a.model:
    values["model"] = a.model
  if a.text:
    values["text"] = a.text
  if a.dtype:
    values["dtype"] = a.dtype
  if a.no_loss_rss:
    values["loss_rss"] = False
  s = Settings(mode=a.mode, **values)
  for name in INT_OPTIONS:
    if name != "warmup" and getattr(s, name) < 1:
      ap.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(s, name)}")
  if s.loss_vocab < s.k:
    ap.error(f"--loss-vocab: expected >= k = {s.k}, got {s.loss_vocab}")
  if s.warmup < 1:  # the first call compiles: never timed
    ap.error(f"--warmup: expected >= 1, got {s.warmup}")
  only = SECTIONS
  if a.only:
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    bad = [x for x in only if x not in SECTIONS]
    if bad or not only:
      ap.error(f"--only: unknown section(s) {bad} (expected some of {','.join(SECTIONS)})")
  return s, only, a.out


def main(argv: list[str] | None = None) -> int:
  s, only, out = parse(argv)
  result = run(s, only, argv)
  text = json.dumps(result, indent=1, sort_keys=False)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text + "\n")
    log(f"wrote {out}")
  else:
    print(text)
  print(summary(result), file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
