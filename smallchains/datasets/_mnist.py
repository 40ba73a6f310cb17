"""MNIST handwritten digits (LeCun, Cortes, Burges), read from the IDX .gz files."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from . import _files

__all__ = ["mnist"]

SPLITS = ("train", "test")

#: The four original files; sha256 from /work/shared/datasets/SOURCES.md (their
#: md5 equal the published values).
FILES = {
    "train-images-idx3-ubyte.gz": ("sha256", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz": ("sha256", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz": ("sha256", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": ("sha256", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}

#: Public mirrors of the original files, tried in order by ``download=True``.
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]


def _read_idx(path: Path, shape: Tuple[int, ...]) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes, checking magic and dims."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = len(shape)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{0x0800 + ndim:08x} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims != shape:
        raise ValueError(f"{path}: IDX dimensions {dims}, expected {shape}")
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, expected {count}")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load(key: tuple, directory: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    # ``key`` (resolved dir + file stats) makes a modified file a cache miss.
    img_name, lbl_name, n = _SPLIT_FILES[split]
    for name in (img_name, lbl_name):
        _files.verify_file(directory / name, FILES[name])
    images = _read_idx(directory / img_name, (n, 28, 28))
    labels = _read_idx(directory / lbl_name, (n,))
    if labels.max() > 9:
        raise ValueError(f"{directory / lbl_name}: label {labels.max()} out of range 0..9")
    x = np.empty((n, 1, 28, 28), dtype=np.float32)
    np.multiply(images[:, None], np.float32(1.0 / 255.0), out=x)
    y = labels.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def mnist(
    split: str = "train",
    data_dir: Optional[_files.PathLike] = None,
    download: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """Load the MNIST handwritten-digit dataset.

    Parameters
    ----------
    split : {"train", "test"}
        ``"train"``: the 60,000 training images; ``"test"``: the 10,000 test
        images. Order is the original file order.
    data_dir : str or os.PathLike, optional
        Directory holding the four original files
        ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
        ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``.
        Default: ``$SMALLCHAINS_DATA/mnist`` if ``SMALLCHAINS_DATA`` is set,
        else ``~/.cache/smallchains/mnist`` (honouring ``XDG_CACHE_HOME``);
        see :func:`smallchains.datasets.data_dir`.
    download : bool, default False
        If True, missing files are fetched from the public mirrors in
        ``MIRRORS`` (tried in order) into the directory, which is created if
        needed. Each download goes to a temporary file in that directory, is
        checksum-verified, then atomically renamed into place. Files already
        present are never re-downloaded.

    Returns
    -------
    images : numpy.ndarray, float32, shape (N, 1, 28, 28)
        NCHW, C-contiguous, pixel values ``byte / 255`` in ``[0, 1]``
        (0 = background). N = 60000 (train) or 10000 (test).
    labels : numpy.ndarray, int64, shape (N,)
        Digit classes 0..9.

    Both arrays are **read-only** views of an in-process cache (an
    :func:`functools.lru_cache` keyed on the resolved directory, split and
    the files' size/mtime/inode), so repeated calls are free and callers
    cannot corrupt the cache. Use ``images.copy()`` for a writable array.

    Raises
    ------
    ValueError
        ``split`` is not ``"train"`` or ``"test"``; or an IDX file has a bad
        magic number, dimensions or length.
    FileNotFoundError
        Files are missing and ``download`` is False. The message names the
        directory searched, how it was chosen, ``SMALLCHAINS_DATA`` and how
        to fix it.
    ChecksumError
        (a ``ValueError``) a file's sha256 differs from the original's; the
        message names the file and both hashes.
    DownloadError
        (an ``OSError``) ``download=True`` and every mirror failed or
        served a file with the wrong checksum; no partial file is left.

    Notes
    -----
    Source: Y. LeCun, C. Cortes and C.J.C. Burges, "The MNIST database of
    handwritten digits", CC BY-SA 3.0. Files are verified against the sha256
    of the original gzip files (whose md5 equal the published values).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    img_name, lbl_name, _ = _SPLIT_FILES[split]
    needed = {n: FILES[n] for n in (img_name, lbl_name)}
    directory = _files.ensure_files(
        "mnist", data_dir, needed, download=download, mirrors=MIRRORS,
        how_to_get="the originals are at http://yann.lecun.com/exdb/mnist/",
        verify=False,
    )
    key = _files.stat_key(directory, needed)
    return _load(key, directory, split)
