"""CIFAR-10 (Krizhevsky, Nair, Hinton), read from the official binary batches."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from . import _files

__all__ = ["cifar10", "PartialDatasetWarning", "CLASSES"]

SPLITS = ("train", "test")

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

_RECORD = 1 + 3 * 32 * 32

#: sha256 from /work/shared/datasets/SOURCES.md; the full test batch is only
#: known by its official SHA-1.
FILES = {
    "data_batch_1.bin": ("sha256", "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5"),
    "data_batch_2.bin": ("sha256", "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed"),
    "data_batch_3.bin": ("sha256", "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67"),
    "data_batch_4.bin": ("sha256", "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48"),
    "data_batch_5.bin": ("sha256", "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add"),
    "test_batch.bin": ("sha1", "67eb016db431130d61cd03c7ad570b013799c88c"),
    "test_batch_first1000.bin": ("sha256", "8314c96d7cd65618193bab23acdd5d4c4af15bf6dd00a1781d55beedf3be1ef5"),
}

_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_HOW_TO_GET = (
    "no automatic download exists for CIFAR-10: get "
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz and put the .bin "
    "files of its cifar-10-batches-bin/ folder into that directory"
)


class PartialDatasetWarning(UserWarning):
    """Only part of a dataset split is available."""


_FULL_TEST = "test_batch.bin"
_PARTIAL_TEST = "test_batch_first1000.bin"


def _read_batch(path: Path) -> np.ndarray:
    """The records of one binary batch as a ``(n, 3073)`` uint8 array; checks the size
    and the labels (after the checksum, so only for files with a patched checksum or an
    unknown one can these fire in practice)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0:
        raise ValueError(f"{path}: the file is empty; expected records of {_RECORD} bytes "
                         "(1 label byte, then 3072 pixel bytes)")
    if raw.size % _RECORD:
        raise ValueError(
            f"{path}: size {raw.size} bytes is not a multiple of the {_RECORD}-byte CIFAR-10 "
            f"record ({raw.size // _RECORD} whole records and {raw.size % _RECORD} bytes "
            "left over): the file is truncated or not a CIFAR-10 binary batch")
    rec = raw.reshape(-1, _RECORD)
    bad = np.flatnonzero(rec[:, 0] > 9)
    if bad.size:
        raise ValueError(f"{path}: label {rec[bad[0], 0]} of record {bad[0]} is out of range "
                         "0..9: not a CIFAR-10 binary batch")
    return rec


@functools.lru_cache(maxsize=2)
def _load(key: tuple, directory: Path, names: Tuple[str, ...],
          grayscale: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    recs = []
    for name in names:
        path = directory / name
        _files.verify_file(path, FILES[name])
        recs.append(_read_batch(path))
    n = sum(len(r) for r in recs)
    x = np.empty((n, 1 if grayscale else 3, 32, 32), dtype=np.float32)
    i = 0
    for rec in recs:
        part = rec[:, 1:].reshape(-1, 3, 32, 32)
        out = x[i:i + len(rec)]
        if grayscale:
            # (R + G + B) / 765 correctly rounded: the sum is exact in float32
            np.sum(part, axis=1, dtype=np.float32, out=out[:, 0])
            np.divide(out, np.float32(765.0), out=out)
        else:
            np.multiply(part, np.float32(1.0 / 255.0), out=out)
        i += len(rec)
    y = np.concatenate([rec[:, 0].astype(np.int64) for rec in recs])
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def cifar10(
    split: str = "train",
    data_dir: Optional[_files.PathLike] = None,
    *,
    grayscale: bool = False,
    allow_partial: bool = True,
) -> Tuple[np.ndarray, np.ndarray]:
    """Load the CIFAR-10 dataset (binary version).

    Parameters
    ----------
    split : {"train", "test"}
        ``"train"``: the 50,000 training images of ``data_batch_1.bin`` ..
        ``data_batch_5.bin``, in that order. ``"test"``: ``test_batch.bin``
        (10,000 images) if present, else ``test_batch_first1000.bin`` (the
        first 1,000 official test records) with a
        :class:`PartialDatasetWarning`.
    data_dir : str or os.PathLike, optional
        Directory holding the ``.bin`` files. Default:
        ``$SMALLCHAINS_DATA/cifar10`` if ``SMALLCHAINS_DATA`` is set, else
        ``~/.cache/smallchains/cifar10`` (honouring ``XDG_CACHE_HOME``).
    grayscale : bool, default False (keyword only)
        Return one channel per image, the mean of R, G and B:
        ``(R + G + B) / 765`` (bytes), correctly rounded to float32, in ``[0, 1]``.
    allow_partial : bool, default True (keyword only)
        With ``False``, ``split="test"`` requires the full ``test_batch.bin`` and
        raises :class:`FileNotFoundError` instead of falling back to
        ``test_batch_first1000.bin``.

    Returns
    -------
    images : numpy.ndarray, float32, shape (N, 3, 32, 32), or (N, 1, 32, 32) with ``grayscale``
        NCHW (channels R, G, B), C-contiguous, values ``byte / 255`` in
        ``[0, 1]``. N = 50000 (train), 10000 or 1000 (test).
    labels : numpy.ndarray, int64, shape (N,)
        Classes 0..9, names in :data:`CLASSES` (airplane .. truck).

    Both arrays are **read-only** and shared with an in-process LRU cache
    (keyed on directory, files and their size/mtime/inode, and ``grayscale``);
    copy them to modify. Note the float32 training set takes about 614 MB
    (205 MB in grayscale).

    Raises
    ------
    TypeError
        ``grayscale`` or ``allow_partial`` is not a bool.
    ValueError
        ``split`` is not ``"train"`` or ``"test"``; or a file is empty, its size is
        not a multiple of 3073 bytes (truncated) or a label is out of range.
    FileNotFoundError
        Files are missing; the message names the missing files, the directory
        searched, ``SMALLCHAINS_DATA`` and how to obtain the files (no
        download). For ``split="test"`` with neither test file present (or
        ``allow_partial=False`` without ``test_batch.bin``) it names
        ``test_batch.bin``.
    ChecksumError
        (a ``ValueError``) a file's checksum (sha256; SHA-1 for the full
        ``test_batch.bin``) differs from the known one.

    Warns
    -----
    PartialDatasetWarning
        ``split="test"`` and only ``test_batch_first1000.bin`` exists: the
        message says that only 1000 of the 10000 test images are returned and
        that ``test_batch.bin`` is missing from the directory.

    Notes
    -----
    Source: A. Krizhevsky, "Learning Multiple Layers of Features from Tiny
    Images", Tech. Report, University of Toronto, 2009. The training
    batches verify byte-identical to the official binary release.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for flag, value in (("grayscale", grayscale), ("allow_partial", allow_partial)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"cifar10: {flag} must be a bool, got {type(value).__name__} {value!r}")
    if split == "train":
        names = _TRAIN
    else:
        directory = _files.data_dir("cifar10", data_dir)
        if (directory / _FULL_TEST).is_file() or not allow_partial \
                or not (directory / _PARTIAL_TEST).is_file():
            names = (_FULL_TEST,)  # a missing file is reported as test_batch.bin
        else:
            names = (_PARTIAL_TEST,)
    needed = {n: FILES[n] for n in names}
    how = _HOW_TO_GET
    if names == (_FULL_TEST,) and allow_partial:
        how += (f" (a folder with only {_PARTIAL_TEST} gives the first 1000 test images, "
                "with a PartialDatasetWarning)")
    directory = _files.ensure_files(
        "cifar10", data_dir, needed, how_to_get=how, verify=False,
    )
    if names == (_PARTIAL_TEST,):
        warnings.warn(
            f"CIFAR-10 test set is PARTIAL: {directory} has no {_FULL_TEST}, so only the "
            f"first 1000 of the 10000 test images are returned (from {_PARTIAL_TEST}); "
            f"put the official {_FULL_TEST} there for the full test set, or pass "
            "allow_partial=False to make this an error",
            PartialDatasetWarning, stacklevel=2,
        )
    key = _files.stat_key(directory, names)
    return _load(key, directory, names, bool(grayscale))
