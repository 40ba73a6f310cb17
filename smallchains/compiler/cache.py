"""The on-disk kernel cache: where generated chain modules are written, and keeping it usable.

A chain's generated module is ``<dir>/_smallchains_kernels_<hash>.py`` (see
:func:`smallchains.compiler.codegen._import_generated`), next to its markers
(``<module>.<kernel>.compiled``, see :mod:`smallchains.compiler.linking`); numba caches
the machine code of its functions in ``<dir>/__pycache__`` (an index ``.nbi`` and data
``.nbc`` files per function), or under ``$NUMBA_CACHE_DIR``, or in numba's user-wide cache
directory when ``__pycache__`` cannot be written. ``<dir>`` is
:func:`smallchains._config.cache_dir`, or :func:`smallchains._config.fallback_cache_dir`
when that cannot be written.

* :func:`write_module`: the module's file, in the cache directory or the fallback.
* :func:`remove_broken`: deletes numba cache files numba could not read (it raises on a
  truncated index or data file instead of recompiling).
* :func:`cache_info`, :func:`clear_cache`: the size of the cache, and emptying it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import shutil
import stat
import sys
import warnings
from pathlib import Path

from .. import _config

#: Name prefix of every generated module (and so of every file derived from one).
PREFIX = "_smallchains_kernels_"


class CacheDirWarning(UserWarning):
    """The kernel cache directory cannot be written: new kernel modules go to a per-user
    temporary directory (:func:`smallchains._config.fallback_cache_dir`) instead."""


_warned = False  # CacheDirWarning issued in this process


def write_module(modname: str, src: str) -> Path:
    """The file of generated module ``modname`` with source ``src``.

    Written (atomically) to :func:`smallchains._config.cache_dir` unless a file there
    already holds ``src``. If that directory cannot be created or written, the file goes
    to :func:`smallchains._config.fallback_cache_dir` instead, with one
    :class:`CacheDirWarning` per process.

    Raises ``OSError`` if the fallback cannot be written either, and ``PermissionError``
    if the fallback's parent directory is not private to this user (a symbolic link,
    another user's, or writable by others: it could hold someone else's machine code).
    """
    global _warned
    try:
        return _write(_config.cache_dir(), modname, src)
    except OSError as e:
        error = e
    directory = _config.fallback_cache_dir()
    _check_private(directory.parent, error)
    path = _write(directory, modname, src)
    if not _warned:
        _warned = True
        warnings.warn(f"smallchains: the kernel cache directory {_config.cache_dir(create=False)} "
                      f"cannot be written ({error}); using {directory} instead (set "
                      "SMALLCHAINS_CACHE_DIR to a writable directory)", CacheDirWarning,
                      stacklevel=2)
    return path


def _write(directory: Path, modname: str, src: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{modname}.py"
    try:
        if path.read_text() == src:
            return path
    except (OSError, ValueError):  # missing, unreadable or not text: (re)write it
        pass
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_text(src)
        os.replace(tmp, path)  # atomic: concurrent processes never see a partial file
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def _check_private(base: Path, error: OSError) -> None:
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not hasattr(os, "getuid"):
        return
    st = os.lstat(base)
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise PermissionError(
            f"smallchains: the kernel cache directory {_config.cache_dir(create=False)} cannot "
            f"be written ({error}), and the fallback {base} is not a private directory of "
            "this user (a link, owned by another user or writable by others); set "
            "SMALLCHAINS_CACHE_DIR to a writable directory")


# --------------------------------------------------------------------------------------
# numba's cache files

def _numba_dirs(directory: Path) -> list:
    """Where numba may cache the functions of modules in ``directory``: its
    ``__pycache__``, and the directories of numba's other cache locators."""
    dirs = [directory / "__pycache__"]
    try:
        from numba.core import config
        from numba.core.caching import _CacheLocator
        from numba.misc.appdirs import AppDirs

        sub = _CacheLocator.get_suitable_cache_subpath(str(directory / "m.py"))
        if config.CACHE_DIR:
            dirs.append(Path(config.CACHE_DIR) / sub)
        dirs.append(Path(AppDirs(appname="numba", appauthor=False).user_cache_dir) / sub)
    except (ImportError, AttributeError):  # another numba: only __pycache__
        pass
    return dirs


def _skip_pickle(f) -> None:
    # walks one pickle's opcodes without building anything; ValueError if it is incomplete
    for _ in pickletools.genops(f):
        pass


def _readable(name: str, data: bytes) -> bool:
    """Whether numba can read its cache file ``name`` with content ``data``: an index is a
    pickled numba version, then (for this numba's version) a pickled ``(stamp, overloads)``;
    a data file is one pickle."""
    f = io.BytesIO(data)
    try:
        _skip_pickle(f)
        if name.endswith(".nbi"):
            import numba

            if pickle.loads(data[:f.tell()]) != numba.__version__:
                return True  # numba ignores the rest of another version's index
            _skip_pickle(f)
    except Exception:
        return False
    return True


def remove_broken(path: Path) -> int:
    """Delete the numba cache files of generated module ``path`` that numba cannot read
    (e.g. truncated), so that numba recompiles their functions instead of raising.

    An unreadable index ``.nbi`` goes with the data files ``.nbc`` it numbers; an
    unreadable data file goes alone (numba recompiles a function whose data file is
    missing and writes it again). Files that cannot be read or removed are left alone.
    Returns the number of files removed.
    """
    removed = 0
    for d in _numba_dirs(path.parent):
        try:
            names = sorted(n for n in os.listdir(d) if n.startswith(path.stem + "."))
        except OSError:
            continue
        broken = set()
        for name in names:
            if not name.endswith((".nbi", ".nbc")) or name in broken:
                continue
            try:
                data = (d / name).read_bytes()
            except OSError:
                continue
            if not _readable(name, data):
                broken.add(name)
                if name.endswith(".nbi"):
                    base = name[:-len("nbi")]
                    broken.update(n for n in names if n.startswith(base) and n.endswith(".nbc"))
        for name in broken:
            try:
                (d / name).unlink()
                removed += 1
            except OSError:
                pass
    return removed


# --------------------------------------------------------------------------------------
# size and cleanup

def _cache_files(directory: Path) -> list:
    """The files of the kernel cache in ``directory``: generated modules, their markers
    and partial writes, leftover claim directories of helper processes, and numba's cache
    files of the modules' functions."""
    files = []
    for d in [directory] + _numba_dirs(directory):
        try:
            entries = list(os.scandir(d))
        except OSError:  # missing (or not a directory)
            continue
        for e in entries:
            if e.name.startswith(PREFIX) and e.is_file(follow_symlinks=False):
                files.append(Path(e.path))
            elif d == directory and e.name.startswith(".claims-") and e.is_dir(follow_symlinks=False):
                files += [p for p in Path(e.path).iterdir() if p.is_file()]
    return files


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def cache_info(directory=None) -> dict:
    """Size of the on-disk kernel cache.

    Parameters
    ----------
    directory : path-like, optional
        The cache directory; default :func:`smallchains._config.cache_dir`
        (``$SMALLCHAINS_CACHE_DIR`` or ``~/.cache/smallchains/kernels``). Not created.

    Returns
    -------
    dict
        ``directory`` (``pathlib.Path``), ``modules`` (number of generated kernel modules,
        one per chain, dtype and block size), ``files`` (those modules and every file made
        from them: markers and numba's cache of their machine code, in the directory's
        ``__pycache__`` or numba's own cache directories) and ``bytes`` (the total size of
        those files). All zero if the directory does not exist.
    """
    directory = _config.cache_dir(create=False) if directory is None else Path(directory)
    files = _cache_files(directory)
    modules = sum(1 for f in files if f.parent == directory and f.suffix == ".py")
    return {"directory": directory, "modules": modules, "files": len(files),
            "bytes": sum(_size(f) for f in files)}


def clear_cache(directory=None) -> int:
    """Delete the on-disk kernel cache: every file :func:`cache_info` counts.

    Other files in the directory are left alone. The source of a generated module that
    this process has imported is kept (numba needs it to compile or load that module's
    kernels); its numba cache files and markers are deleted. Do not call this while
    other processes use the directory: a process may then fail to compile a kernel.

    Parameters
    ----------
    directory : path-like, optional
        The cache directory; default :func:`smallchains._config.cache_dir`. A missing
        directory is an empty cache (nothing is created).

    Returns
    -------
    int
        The number of bytes freed (0 if nothing was removed).

    Raises
    ------
    OSError
        If a file cannot be removed (e.g. a read-only directory).
    """
    directory = _config.cache_dir(create=False) if directory is None else Path(directory)
    in_use = {os.path.realpath(m.__file__) for name, m in list(sys.modules.items())
              if name.startswith(PREFIX) and getattr(m, "__file__", None)}
    freed = 0
    for f in _cache_files(directory):
        if f.suffix == ".py" and os.path.realpath(f) in in_use:
            continue
        size = _size(f)
        try:
            f.unlink()
        except FileNotFoundError:  # removed meanwhile
            continue
        freed += size
    for d in directory.glob(".claims-*") if directory.is_dir() else ():
        shutil.rmtree(d, ignore_errors=True)
    return freed
