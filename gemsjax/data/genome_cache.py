"""The prepared-genome cache: where it lives, what it is keyed on, and how to list or clear it.

A run with ``data.prepared_dir`` empty prepares its genome (:func:`gemsjax.data.genome.
prepare_genome`) under :func:`cache_root` (``$GEMSJAX_CACHE``, default ``~/.cache/gemsjax``) in
``genome-<first file stem>-<digest>``, the digest taken over the **content** (sha256) of the FASTA
files in order, so an edited input never reuses a stale copy, whatever its size and mtime. A
prepared genome takes 1 byte per A/C/G/T base (3.1 GB for a human genome, 0.9 MB for the shipped
chr22 sample) and is checked against its manifest on every use and rebuilt when it differs.

Each start removes the temporary folders of preparations whose process is gone (killed
mid-write). From the command line::

    python -m gemsjax.data.genome_cache list              # cached genomes, sizes, inputs
    python -m gemsjax.data.genome_cache rebuild A.fa ...  # prepare these inputs again
    python -m gemsjax.data.genome_cache clear             # delete the whole cache
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
import time
from collections.abc import Sequence

from gemsjax.data import genome
from gemsjax.data.fasta import resolve_paths

CACHE_ENV = "GEMSJAX_CACHE"
ORPHAN_AGE_S = 24 * 3600
"""A temporary folder of another host is removed once it is this old (its writer cannot be
checked from here)."""


def cache_root() -> pathlib.Path:
    """``$GEMSJAX_CACHE``, default ``~/.cache/gemsjax``."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "gemsjax")


def cache_dir(
    fasta_paths: Sequence[pathlib.Path], root: pathlib.Path | None = None
) -> pathlib.Path:
    """``<root>/genome-<first file stem>-<digest of the inputs' sha256s, in order>``."""
    sources = genome.describe_sources(fasta_paths)
    key = "\n".join(s["sha256"] for s in sources)
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return (root or cache_root()) / f"genome-{fasta_paths[0].name.split('.')[0]}-{digest}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(root: pathlib.Path) -> list[pathlib.Path]:
    """Delete temporary preparation folders under ``root`` whose writer is gone: on this host, a
    process that no longer exists; on another host, older than :data:`ORPHAN_AGE_S`. Returns the
    removed folders."""
    removed = []
    if not root.is_dir():
        return removed
    host = socket.gethostname()
    for path in root.glob(".*.tmp-*"):
        tail = path.name.rsplit(".tmp-", 1)[1]
        owner, _, rest = tail.rpartition("-")[0].rpartition("-")
        pid = int(rest) if rest.isdigit() else None
        if owner == host and pid is not None:
            orphan = not _alive(pid)
        else:
            orphan = time.time() - path.stat().st_mtime > ORPHAN_AGE_S
        if orphan:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prepared_genome(
    fasta_paths: Sequence[pathlib.Path],
    prepared_dir: str | os.PathLike | None = None,
    *,
    rebuild: bool = False,
) -> pathlib.Path:
    """The prepared copy of ``fasta_paths``: ``prepared_dir`` if given, else the cache folder
    (:func:`cache_dir`); prepared or rebuilt as needed (see :func:`genome.prepare_genome`),
    after removing orphaned temporary folders beside it."""
    out = pathlib.Path(prepared_dir) if prepared_dir else cache_dir(fasta_paths)
    remove_orphans(out.parent)
    return genome.prepare_genome(fasta_paths, out, overwrite=rebuild)


def cached() -> list[dict]:
    """``[{"path", "bytes", "inputs"}]`` for each prepared genome under :func:`cache_root`."""
    out = []
    for path in sorted(cache_root().glob("genome-*")):
        files = [f for f in path.iterdir() if f.is_file()]
        try:
            inputs = [
                s["path"] for s in json.loads((path / genome.MANIFEST_FILE).read_text())["sources"]
            ]
        except (OSError, ValueError, KeyError, TypeError):
            inputs = None
        out.append(
            {"path": str(path), "bytes": sum(f.stat().st_size for f in files), "inputs": inputs}
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemsjax.data.genome_cache", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="cached genomes with sizes and inputs")
    sub.add_parser("clear", help="delete the whole cache")
    rebuild = sub.add_parser("rebuild", help="prepare FASTA file(s) again")
    rebuild.add_argument("fasta", nargs="+")
    rebuild.add_argument(
        "--prepared-dir", default=None, help="the run's data.prepared_dir, if it sets one"
    )
    args = parser.parse_args(argv)
    if args.command == "list":
        entries = cached()
        for entry in entries:
            print(f"{entry['bytes'] / 2**20:10.1f} MiB  {entry['path']}  {entry['inputs']}")
        print(f"{sum(e['bytes'] for e in entries) / 2**20:10.1f} MiB  in {cache_root()}")
    elif args.command == "clear":
        shutil.rmtree(cache_root(), ignore_errors=True)
        print(f"removed {cache_root()}")
    else:
        out = prepared_genome(resolve_paths(args.fasta), args.prepared_dir, rebuild=True)
        print(f"prepared {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
