"""URL run folders and data paths: ``gs://bucket/...`` (or any scheme fsspec has a package for).

A run whose ``--workdir`` is a URL (:func:`staged_workdir`):

- writes its **checkpoints straight to the URL** through Orbax (tensorstore for the arrays, so
  every host of a pod writes its shards to the one place they all see, and a preempted VM loses
  nothing that was saved);
- keeps its **other files** -- ``config.json``, ``metrics.jsonl``, ``train.log``,
  ``tensorboard/``, plots, reports, embeddings -- in a local *staging copy* under
  ``$GEMSJAX_CACHE/staging/<scheme>/<bucket>/<path>``: rebuilt from the URL when the run starts
  (so a run resumed on another machine continues the same ``metrics.jsonl``), pushed back after
  every checkpoint (:func:`push`) and when the command ends, however it ends. Object stores cannot
  append, and these files grow line by line; the staging copy lets them.

Data paths given as URLs (FASTA, tables, rank tables, task folders: any string config value that
is a URL, except ``init``) are downloaded once into ``$GEMSJAX_CACHE/remote/`` and read from
there (:func:`localize_config`); a copy is fetched again when the object's size or checksum
changes. ``config.json`` and the checkpoints' metadata record the URLs, not the copies
(:func:`sources`), so a run resumes on a machine whose cache lives elsewhere. ``init`` (a
pretraining run folder for a downstream command) is read in place: only the chosen checkpoint's
encoder arrays travel.

The filesystem package of a scheme (``gcsfs`` for ``gs://``: the ``[gcs]`` extra; ``s3fs`` for
``s3://``) is needed only when such a URL is used; without it the command stops with one line
naming the package. Only process 0 pushes; the staging copy has no lock across machines, so one
URL must be written by one run at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
from collections.abc import Iterator
from typing import Any

from gemsjax.errors import UserError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.+)$")
MARKER = ".gemsjax-remote.json"  # in a staging copy's root: its URL and what was pushed
CHECKPOINTS = "checkpoints"
_PACKAGES = {"gs": "gcsfs (pip install 'gemsjax[gcs]')", "gcs": "gcsfs", "s3": "s3fs"}


def is_url(value: Any) -> bool:
    """Whether ``value`` is a string of the form ``scheme://rest``."""
    return isinstance(value, str) and _URL.match(value) is not None


def readable(path: str | os.PathLike) -> Any:
    """``path`` as an ``etils.epath.Path`` for Orbax to read: a URL as it is, a local path made
    absolute (Orbax restores only from absolute paths, and run folders are often named
    relative, ``runs/<name>``)."""
    from etils import epath

    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(text))


def filesystem(url: str, what: str):
    """The fsspec filesystem that serves ``url``.

    Raises:
      UserError: the scheme is unknown to fsspec, or its package is not installed; ``what``
        (e.g. ``--workdir``) names the setting in the message.
    """
    import fsspec

    scheme = _URL.match(url).group(1)
    try:
        return fsspec.filesystem(scheme)
    except ImportError:
        package = _PACKAGES.get(scheme, f"the fsspec package for {scheme}://")
        raise UserError(f"{what}={url}: reading {scheme}:// needs {package}") from None
    except ValueError:
        raise UserError(
            f"{what}={url}: no filesystem knows {scheme}:// (gs:// needs gcsfs, s3:// s3fs); "
            "use a local path or a supported URL"
        ) from None


def _cache_path(kind: str, url: str) -> pathlib.Path:
    from gemsjax.data.genome_cache import cache_root

    scheme, rest = _URL.match(url.rstrip("/")).groups()
    return cache_root() / kind / scheme / rest


def _files(fs, url: str) -> dict[str, dict]:
    """``{path relative to url: info}`` for every object under the folder ``url`` except its
    checkpoints folder (read by Orbax in place)."""
    base = fs._strip_protocol(url).rstrip("/") + "/"
    found = {}
    for name, info in fs.find(url, detail=True).items():
        rel = name.removeprefix(base)
        if rel != name and rel.split("/")[0] != CHECKPOINTS:
            found[rel] = info
    return found


def _read_marker(folder: pathlib.Path) -> dict | None:
    path = folder / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def _root_of(path: pathlib.Path) -> tuple[pathlib.Path, dict] | tuple[None, None]:
    """The staging copy holding ``path`` (itself or a parent) and its marker."""
    path = pathlib.Path(path).absolute()
    for folder in (path, *path.parents):
        if (marker := _read_marker(folder)) is not None:
            return folder, marker
    return None, None


def url_of(path: str | pathlib.Path) -> str | None:
    """The URL that the staging-copy path ``path`` stands for (a URL: itself); None for a plain
    local path."""
    if is_url(path):
        return path
    root, marker = _root_of(path)
    if root is None:
        return None
    rel = pathlib.Path(path).absolute().relative_to(root).as_posix()
    return marker["url"] if rel == "." else f"{marker['url']}/{rel}"


def shown(path: str | pathlib.Path) -> str:
    """``path`` as messages and summaries name it: the URL a staging copy stands for, else the
    path itself."""
    return url_of(path) or str(path)


def _local_only() -> tuple[str, ...]:
    """Entries of a staging copy's root that never travel: its marker and the machine's lock."""
    from gemsjax.train.workdir import LOCK_FILE  # not at the top: workdir imports config

    return MARKER, LOCK_FILE


def checkpoint_dir(workdir: pathlib.Path) -> str:
    """Where the run in ``workdir`` keeps its checkpoints: ``<URL>/checkpoints`` for a staging
    copy, else the absolute local ``<workdir>/checkpoints``."""
    url = url_of(workdir)
    return f"{url}/{CHECKPOINTS}" if url else str((pathlib.Path(workdir) / CHECKPOINTS).resolve())


def stage(url: str) -> pathlib.Path:
    """Rebuild the local staging copy of the run folder ``url`` (every file but its
    checkpoints; the lock file is kept); returns the local folder. The URL need not exist
    yet."""
    url = url.rstrip("/")
    fs = filesystem(url, "--workdir")
    local = _cache_path("staging", url)
    local.mkdir(parents=True, exist_ok=True)
    for child in local.iterdir():
        if child.name in _local_only():
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    remote = _files(fs, url) if fs.exists(url) else {}
    for rel in remote:
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{url}/{rel}", str(local / rel))
    pushed = {rel: _stamp(local / rel) for rel in remote}
    (local / MARKER).write_text(json.dumps(dict(url=url, pushed=pushed)))
    return local


def _stamp(path: pathlib.Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def push(workdir: pathlib.Path) -> int:
    """Upload the files of the staging copy holding ``workdir`` that changed since the last push
    (every file but its checkpoints, which Orbax wrote in place); returns how many. A plain
    local ``workdir`` is left alone (0)."""
    root, marker = _root_of(workdir)
    if root is None:
        return 0
    fs = filesystem(marker["url"], "--workdir")
    pushed, count = marker["pushed"], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in _local_only() or rel.split("/")[0] == CHECKPOINTS:
            continue
        if pushed.get(rel) == (stamp := _stamp(path)):
            continue
        fs.put_file(str(path), f"{marker['url']}/{rel}")
        pushed[rel], count = stamp, count + 1
    (root / MARKER).write_text(json.dumps(dict(url=marker["url"], pushed=pushed)))
    return count


@contextlib.contextmanager
def staged_workdir(value: str, *, lead: bool = True) -> Iterator[pathlib.Path]:
    """``with staged_workdir("gs://b/run") as workdir:`` run in the local staging copy of the
    URL: process 0 locks it (a second command on this machine with the same URL stops, naming
    the first, before touching the copy), rebuilds it from the URL and pushes it when the block
    ends, however it ends. A plain path is yielded as it is. Other processes get an empty copy
    of their own: they write only checkpoints, which go to the URL."""
    from gemsjax.train import workdir as workdir_lib  # not at the top: it imports config

    if not is_url(value):
        yield pathlib.Path(value)
        return
    url = value.rstrip("/")
    if not lead:
        local = _cache_path("staging-other-processes", url)
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        (local / MARKER).write_text(json.dumps(dict(url=url, pushed={})))
        yield local
        return
    with workdir_lib.lock(_cache_path("staging", url)):
        local = stage(url)
        try:
            yield local
        finally:
            push(local)


def _version(info: dict) -> list:
    """What identifies one version of an object: its size and checksum (or time)."""
    tag = info.get("md5Hash") or info.get("ETag") or info.get("updated") or info.get("mtime")
    return [info.get("size"), str(tag)]


def localize(url: str, what: str) -> str:
    """The local copy of the file or folder ``url``, downloaded into ``$GEMSJAX_CACHE/remote``
    (an object again when its size or checksum changed; ``<copy>.source.json`` beside the copy
    records the versions); ``what`` names the setting in errors."""
    url = url.rstrip("/")
    fs = filesystem(url, what)
    if not fs.exists(url):
        raise UserError(f"{what}={url}: no such object or folder; check the URL")
    local = _cache_path("remote", url)
    objects = _files(fs, url) if fs.isdir(url) else {"": fs.info(url)}
    manifest = local.with_name(local.name + ".source.json")
    have = json.loads(manifest.read_text()) if manifest.is_file() else {}
    for rel, info in objects.items():
        target = local / rel if rel else local
        if target.is_file() and have.get(rel) == _version(info):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.part-{os.getpid()}")
        fs.get_file(f"{url}/{rel}" if rel else url, str(partial))
        os.replace(partial, target)  # atomic: processes sharing the cache never read half a file
        have[rel] = _version(info)
    manifest.write_text(json.dumps(have))
    return str(local)


def _split_hf(value: str) -> tuple[str, str]:
    """``"hf:<folder>"`` (a transformers folder, ``model.init``) -> ``("hf:", folder)``."""
    return ("hf:", value[3:]) if value.startswith("hf:") else ("", value)


def source_of(value: Any) -> Any:
    """The URL that a local copy made by :func:`localize` stands for (``hf:`` kept); other
    values unchanged."""
    from gemsjax.data.genome_cache import cache_root

    if not isinstance(value, str):
        return value
    head, path = _split_hf(value)
    root = f"{cache_root() / 'remote'}/"
    if path.startswith(root):
        scheme, _, rest = path.removeprefix(root).partition("/")
        return f"{head}{scheme}://{rest}"
    return value


def sources(tree: Any) -> Any:
    """``tree`` (JSON-like: dicts, lists, tuples, strings) with local copies replaced by their
    URLs (:func:`source_of`)."""
    if isinstance(tree, dict):
        return {k: sources(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(map(sources, tree))
    return source_of(tree)


def localize_config(config, skip: tuple[str, ...] = ("init",)) -> list[tuple[str, str]]:
    """Replace every URL string value of ``config`` (``hf:<URL>`` and tuples of paths included;
    keys in ``skip``, read in place, excepted) by its local copy (:func:`localize`); returns
    ``[(key, url)]``."""
    done = []

    def local(value, name: str):
        if not isinstance(value, str):
            return value
        head, path = _split_hf(value)
        if not is_url(path):
            return value
        done.append((name, value))
        return head + localize(path, f"config.{name}")

    def walk(node, prefix: str) -> None:
        for key in list(node.keys()):
            name, value = f"{prefix}{key}", node[key]
            if hasattr(value, "keys"):
                walk(value, f"{name}.")
            elif name in skip:
                continue
            elif isinstance(value, tuple):
                node[key] = tuple(local(v, name) for v in value)
            elif (new := local(value, name)) is not value:
                node[key] = new

    walk(config, "")
    return done
