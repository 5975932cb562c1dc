"""Assemble bench/device_check.sh's one JSON: device, versions, each section's ratio against
PyTorch on the same device, tokens/s, MFU against the measured peak and the spec sheet's
(issue 23, item 5).

    python -m bench.device_check --bench OUT/bench_bf16.json --smoke OUT/smoke --out OUT/device_check.json

--bench: bench.run's JSON; --smoke: the smoke pipeline's workdir (its timings.json and
eval/results.json). The spec-sheet peak is the dense bf16 matmul rate of the device's data
sheet (SPEC_PEAK_BF16 by device kind); a device not in the table gets null there.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from bench import report

# Dense (no sparsity) bf16 tensor-core FLOP/s from NVIDIA's data sheets.
SPEC_PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12,
                  "H100 NVL": 835e12, "H200": 989e12, "A100-SXM4-80GB": 312e12,
                  "A100-SXM4-40GB": 312e12, "A100-PCIE-40GB": 312e12, "L4": 121e12}


def spec_peak(kind: str) -> float | None:
  for name, peak in SPEC_PEAK_BF16.items():
    if name.lower() in kind.lower():
      return peak
  return None


def summarize(bench: dict, smoke_dir: str | None) -> dict[str, Any]:
  meta = bench["meta"]
  kind = str((meta.get("jax_devices") or ["?"])[0])
  peak = spec_peak(kind)
  sections: dict[str, Any] = {}
  for name, sec in bench["sections"].items():
    row: dict[str, Any] = {k: sec[k] for k in ("speedup_vs_torch", "tokens_per_s", "mfu")
                           if k in sec}
    flops = sec.get("train_flops_per_step") or (sec.get("forward_flops") or {}).get("total")
    timings = sec.get("timings", {})
    if peak and flops and "first_jax" in timings:
      row["mfu_vs_spec_sheet"] = {who: flops / t["median_s"] / peak
                                  for who, t in timings.items() if "median_s" in t}
    sections[name] = row
  out = {"device": kind, "jax_backend": meta.get("jax_backend"), "versions": meta["versions"],
         "dtype": bench["dtype"], "spec_peak_bf16_flops": peak, "bench_command": bench["command"],
         "sections": sections,
         "ratios": {k: bench[k] for k in ("extraction_speedup_vs_torch",
                                          "postforward_speedup_vs_reference",
                                          "step_speedup_vs_torch", "search_speedup_vs_numpy",
                                          "loss_memory_ratio_vs_naive") if k in bench}}
  if smoke_dir:
    with open(os.path.join(smoke_dir, "timings.json")) as f:
      out["smoke_stage_s"] = json.load(f)
    with open(os.path.join(smoke_dir, "eval", "results.json")) as f:
      out["smoke_models"] = sorted(json.load(f)["results"])
  return out


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--bench", required=True)
  ap.add_argument("--smoke", default=None)
  ap.add_argument("--out", required=True)
  a = ap.parse_args(argv)
  with open(a.bench) as f:
    out = summarize(json.load(f), a.smoke)
  report.atomic_write(a.out, json.dumps(out, indent=1) + "\n")
  print(json.dumps(out["ratios"], indent=1))
  return out


if __name__ == "__main__":
  main()
