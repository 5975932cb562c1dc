"""What every section of bench/run.py shares: settings, timing (warm-up, interleaved
repetitions), the environment record, model FLOPs, first_jax's API as training calls it, and
the context (model, mesh, text) built once per run."""
from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE_VOCABS = (49_152, 151_936)  # SmolLM2, Qwen2

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
  samples: int = 10  # U of a sampled store (extract.samples' default)
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


def sample_program(module, params, num: int, mesh) -> tuple[Callable, str]:
  """first_jax's sampled-extraction program at all positions (T = 1, seed 0) and its call."""
  from first_jax.engine import infer
  return (infer.sample_program(module, params, num, 1.0, 0, False, mesh),
          "infer.sample_program(module, params, num, t=1.0, seed=0, answer_only=False, mesh)")


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
      text, source = EMBEDDED_TEXT, "embedded paragraph (bench/common.py), repeated"
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
