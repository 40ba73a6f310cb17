"""Locating, verifying and downloading dataset files.

Directory resolution (see :func:`data_dir`):

1. an explicit ``data_dir`` argument, used as is;
2. else ``$SMALLCHAINS_DATA/<dataset>`` if the environment variable
   ``SMALLCHAINS_DATA`` is set and non-empty;
3. else ``$XDG_CACHE_HOME/smallchains/<dataset>`` (``XDG_CACHE_HOME``
   defaulting to ``~/.cache``).

Every file is checked against a hard-coded checksum before it is parsed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Tuple, Union

__all__ = ["ENV_VAR", "ChecksumError", "DownloadError", "data_dir"]

ENV_VAR = "SMALLCHAINS_DATA"

PathLike = Union[str, "os.PathLike[str]"]
#: (algorithm name understood by :mod:`hashlib`, lowercase hex digest)
Checksum = Tuple[str, str]

_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A dataset file does not have its expected checksum.

    Attributes
    ----------
    path : str
        The offending file (or URL for a download).
    algorithm, expected, actual : str
        Hash algorithm and the expected / actual hex digests.
    """

    def __init__(self, path, algorithm, expected, actual, hint=""):
        self.path = str(path)
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual
        msg = (
            f"checksum mismatch for {self.path}: expected {algorithm} {expected}, "
            f"got {actual}"
        )
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class DownloadError(OSError):
    """Every mirror failed to deliver a dataset file (network error or bad checksum)."""


def _cache_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    return Path.home() / ".cache"


def _resolve(dataset: str, path: Optional[PathLike]) -> Tuple[Path, str]:
    """Return (directory, human-readable description of how it was chosen)."""
    if path is not None:
        return Path(os.fspath(path)).expanduser(), "the data_dir argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser() / dataset, f"${ENV_VAR}={env}"
    return _cache_home() / "smallchains" / dataset, (
        f"the default cache directory (${ENV_VAR} is not set)"
    )


def data_dir(dataset: str, path: Optional[PathLike] = None) -> Path:
    """Directory in which the files of ``dataset`` are looked for.

    Parameters
    ----------
    dataset : str
        Dataset name, e.g. ``"mnist"`` or ``"cifar10"``.
    path : str or os.PathLike, optional
        Explicit directory. If given it is returned unchanged (``~`` expanded);
        it must contain the dataset files directly (no ``<dataset>``
        sub-folder is appended).

    Returns
    -------
    pathlib.Path
        ``path`` if given; else ``$SMALLCHAINS_DATA/<dataset>`` if the
        environment variable is set and non-empty; else
        ``$XDG_CACHE_HOME/smallchains/<dataset>`` with ``XDG_CACHE_HOME``
        defaulting to ``~/.cache``. The directory is not created and need
        not exist.
    """
    return _resolve(dataset, path)[0]


def file_digest(path: PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: PathLike, checksum: Checksum) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has ``checksum``."""
    algorithm, expected = checksum
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        raise ChecksumError(
            path, algorithm, expected, actual,
            hint="The file is corrupt or not the original; delete it and obtain it again.",
        )


def _fetch(url: str, out, timeout: float = 60.0) -> None:
    """Stream ``url`` into the binary file object ``out``. Patched in tests."""
    req = urllib.request.Request(url, headers={"User-Agent": "smallchains"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for chunk in iter(lambda: resp.read(_CHUNK), b""):
            out.write(chunk)


def download_file(
    name: str,
    directory: Path,
    checksum: Checksum,
    mirrors: Iterable[str],
    fetch: Optional[Callable] = None,
) -> Path:
    """Download ``name`` from the first working mirror into ``directory``.

    Data go to a temporary file in ``directory``, which is verified and then
    atomically renamed with :func:`os.replace`; on any failure the temporary
    file is removed, so no partial or unverified file is ever left under the
    final name.
    """
    fetch = fetch or _fetch
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                fetch(url, out)
            algorithm, expected = checksum
            actual = file_digest(tmp, algorithm)
            if actual != expected.lower():
                raise ChecksumError(url, algorithm, expected, actual)
            os.replace(tmp, target)
            return target
        except (OSError, ValueError, urllib.error.URLError) as exc:
            failures.append(f"  {url}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DownloadError(
        f"could not download {name} into {directory}; every mirror failed:\n"
        + "\n".join(failures)
    )


def ensure_files(
    dataset: str,
    path: Optional[PathLike],
    files: Mapping[str, Checksum],
    download: bool = False,
    mirrors: Iterable[str] = (),
    how_to_get: str = "",
    verify: bool = True,
) -> Path:
    """Resolve the directory, optionally download missing files, verify all.

    Returns the directory. With ``verify=False`` the checksums of files that
    were already present are not checked (callers then verify on cache miss).
    Raises :class:`FileNotFoundError` if files are
    missing (and not downloaded), :class:`ChecksumError` if a present file is
    corrupt, :class:`DownloadError` if a download fails.
    """
    directory, how = _resolve(dataset, path)
    missing = [n for n in files if not (directory / n).is_file()]
    if missing and download:
        mirrors = list(mirrors)
        if not mirrors:
            raise ValueError(f"no download mirrors are known for {dataset!r}")
        for n in missing:
            download_file(n, directory, files[n], mirrors)
        missing = []
    if missing:
        fixes = [
            "pass data_dir=<directory holding these files>",
            f"or set the environment variable {ENV_VAR} to a folder that has a "
            f"'{dataset}' sub-folder with these files",
        ]
        if mirrors:
            fixes.append("or pass download=True to fetch them from a public mirror")
        if how_to_get:
            fixes.append(how_to_get)
        raise FileNotFoundError(
            f"{dataset} files not found in directory {directory} (chosen from {how}). "
            f"Missing: {', '.join(missing)}. To fix: " + "; ".join(fixes) + "."
        )
    if verify:
        for n, checksum in files.items():
            verify_file(directory / n, checksum)
    return directory


def stat_key(directory: Path, names: Iterable[str]) -> tuple:
    """Cache key that changes if any of the files is replaced or modified."""
    key = [str(directory.resolve())]
    for n in names:
        st = os.stat(directory / n)
        key.append((n, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(key)
