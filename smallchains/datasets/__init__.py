"""Datasets for smallchains: MNIST, CIFAR-10, a synthetic matrix-exponential task and the
spiral ODE of torchdiffeq's neural-ODE demo.

Real data are never shipped with the package. They are looked up in (first
match): an explicit ``data_dir`` argument; ``$SMALLCHAINS_DATA/<name>``;
``~/.cache/smallchains/<name>`` (``XDG_CACHE_HOME`` honoured). Every file is
checksum-verified before use. See :func:`data_dir`.
"""

from ._files import ENV_VAR, ChecksumError, DownloadError, data_dir
from ._mnist import mnist
from ._cifar10 import CLASSES as CIFAR10_CLASSES, PartialDatasetWarning, cifar10
from ._spiral import SPIRAL_A, spiral
from ._synthetic import expm2x2, matrix_exponential

__all__ = [
    "mnist",
    "cifar10",
    "matrix_exponential",
    "spiral",
    "SPIRAL_A",
    "data_dir",
    "expm2x2",
    "ChecksumError",
    "DownloadError",
    "PartialDatasetWarning",
    "CIFAR10_CLASSES",
    "ENV_VAR",
]
