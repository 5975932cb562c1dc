"""What a user would run instead of first_jax: PyTorch / transformers baselines for bench/run.py.

Written to be fair to the baseline: batched, `torch.no_grad()` for forward-only work, threads set
by the caller to the core count, at the precision first_jax computes in: float32 throughout, or
with `dtype="bfloat16"` float32 weights run under `torch.autocast("cpu", torch.bfloat16)` (the
mixed precision a PyTorch user runs; losses and log-softmax in float32).
Nothing here is imported by the first_jax package. The device is the CPU, or the one named by
BENCH_TORCH_DEVICE (e.g. `cuda`, as bench/device_check.sh sets): models and inputs are moved
there, results come back to the host, and every timed call ends synchronized.

- `load_causal_lm(hf_dir)`: transformers' AutoModelForCausalLM from first_jax's own HF export.
- `extract(model, ids, mask, k)`: forward + log_softmax + batched torch.topk (+ the tail mass).
- `reference_postforward(logits, k, path)`: FIRST's reference code's way after the forward: a
  full log_softmax, then a Python loop over positions building one {token_id: logprob} dict per
  position with `.item()`, one `json.dumps` line per example into a JSONL file.
- `jsonl_row(ids_LxK, vals_LxK)`: that JSONL line for given top-k ids and values (for sizes).
- `TrainStep`: one AdamW step, full-position cross-entropy, global-norm clipping.
"""
from __future__ import annotations

import json
import os
import contextlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def device() -> torch.device:
  """Where the baselines run: $BENCH_TORCH_DEVICE (default cpu)."""
  return torch.device(os.environ.get("BENCH_TORCH_DEVICE", "cpu"))


def sync() -> None:
  if device().type == "cuda":
    torch.cuda.synchronize()


def set_threads(n: int) -> int:
  """torch intra-op threads = n; returns the previous setting (to restore)."""
  old = torch.get_num_threads()
  torch.set_num_threads(max(1, int(n)))
  return old


def load_causal_lm(hf_dir: str | os.PathLike, train: bool = False):
  """transformers' model for an HF folder, float32, eval mode unless `train`."""
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(os.fspath(hf_dir), dtype=torch.float32)
  model = model.to(device())
  return model.train() if train else model.eval()


def attn_implementation(model) -> str:
  return str(getattr(model.config, "_attn_implementation", "unknown"))


def logits(model, ids_BxL: np.ndarray, mask_BxL: np.ndarray) -> np.ndarray:
  """float32 logits [B, L, V] as numpy (forward only)."""
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(np.asarray(ids_BxL, np.int64)).to(device()),
                attention_mask=torch.from_numpy(np.asarray(mask_BxL, np.int64)).to(device())
                ).logits
  return out.float().cpu().numpy()


def autocast(dtype: str = "float32"):
  """`torch.autocast` on the device for dtype "bfloat16"; a no-op context for "float32"."""
  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device().type, dtype=getattr(torch, dtype))


def extract(model, ids_BxL: torch.Tensor, mask_BxL: torch.Tensor, k: int,
            dtype: str = "float32") -> dict[str, np.ndarray]:
  """The extraction a user writes with transformers: forward, full log_softmax, batched top-k.

  Returns numpy {logprobs [B, L, K], ids [B, L, K], tail [B, L]} (tail = log of the mass outside
  the top-k, as first_jax's store keeps).
  """
  with torch.no_grad():
    with autocast(dtype):
      out = model(input_ids=ids_BxL.to(device()), attention_mask=mask_BxL.to(device())).logits
    lp = torch.log_softmax(out.float(), dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    kept = vals.exp().sum(-1).clamp(max=1.0 - 1e-7)
    tail = torch.log1p(-kept)
  return {"logprobs": vals.cpu().numpy(), "ids": ids.cpu().numpy(), "tail": tail.cpu().numpy()}


def jsonl_row(ids_LxK: np.ndarray, vals_LxK: np.ndarray) -> str:
  """One example as FIRST's reference code writes it: a JSON list of {token_id: value} dicts.

  The values are Python floats of float32 numbers (what `.item()` of a float32 tensor gives),
  so they print with up to 17 significant digits.
  """
  ids = np.asarray(ids_LxK).astype(np.int64).tolist()
  vals = np.asarray(vals_LxK, np.float32).tolist()
  return json.dumps([dict(zip(i, v)) for i, v in zip(ids, vals)]) + "\n"


def jsonl_bytes(ids_NxLxK: np.ndarray, vals_NxLxK: np.ndarray) -> int:
  """Bytes of the reference JSONL for N examples (utf-8; the dumps are ASCII)."""
  return sum(len(jsonl_row(i, v).encode()) for i, v in zip(ids_NxLxK, vals_NxLxK))


def reference_postforward(logits_BxLxV: torch.Tensor, k: int, path: str | os.PathLike) -> int:
  """Given logits: the reference code's post-forward path; returns the bytes written.

  The top-k itself is taken batched (kinder to the baseline than a per-position topk); the loop
  over positions with `.item()` and the JSON lines are the reference code's.
  """
  with torch.no_grad():
    lp = torch.log_softmax(logits_BxLxV, dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    b, l = vals.shape[:2]
    with open(path, "w") as f:
      for r in range(b):
        row = []
        for t in range(l):
          row.append({ids[r, t, j].item(): vals[r, t, j].item() for j in range(k)})
        f.write(json.dumps(row) + "\n")
  return os.path.getsize(path)


class TrainStep:
  """One AdamW update of a transformers model on a token-mean, masked cross-entropy.

  The same update as first_jax's `step.train_step` (kind="ce") with `step.make_optimizer`:
  global-norm clipping, then AdamW (decoupled weight decay) at a constant learning rate.
  """

  def __init__(self, model, *, lr: float, weight_decay: float, b1: float, b2: float, eps: float,
               clip_norm: float, dtype: str = "float32"):
    self.model = model.train()
    self.dtype = dtype
    self.clip_norm = clip_norm
    self.params: Sequence[torch.nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(b1, b2), eps=eps,
                                 weight_decay=weight_decay)

  def __call__(self, ids_BxL: torch.Tensor, mask_BxL: torch.Tensor, targets_BxL: torch.Tensor,
               loss_mask_BxL: torch.Tensor) -> float:
    self.opt.zero_grad(set_to_none=True)
    dev = device()
    ids_BxL, mask_BxL, targets_BxL, loss_mask_BxL = (
        t.to(dev) for t in (ids_BxL, mask_BxL, targets_BxL, loss_mask_BxL))
    with autocast(self.dtype):  # the forward; the loss in float32, backward outside
      out = self.model(input_ids=ids_BxL, attention_mask=mask_BxL).logits
    per_token = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), targets_BxL.reshape(-1),
                                reduction="none")
    w = loss_mask_BxL.reshape(-1)
    loss = (per_token * w).sum() / w.sum().clamp(min=1.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
    self.opt.step()
    return float(loss.detach())


def matmul(n: int, seed: int = 0, dtype: str = "float32"):
  """A closure timing one [n, n] @ [n, n] with torch.mm in `dtype` (2 n^3 FLOPs)."""
  g = torch.Generator().manual_seed(seed)
  a = torch.randn(n, n, generator=g, dtype=torch.float32).to(device(), getattr(torch, dtype))
  b = torch.randn(n, n, generator=g, dtype=torch.float32).to(device(), getattr(torch, dtype))

  def run():
    with torch.no_grad():
      out = torch.mm(a, b)
    sync()
    return out
  return run
