"""smallchains: fast training and differentiation of small neural networks on the CPU.

A Python/numba take on SimpleChains.jl (Elrod, Korsbo, Rackauckas, 2022): a chain of
fixed-size layers is compiled into fused, allocation-free forward and pullback kernels
over one flat parameter vector; training runs with per-thread gradient buffers in
compiled code.
"""

__version__ = "0.1.0"

from . import _cpu  # noqa: F401  (must run before numba is imported)
from .activations import Activation, available_activations, get_activation
from .compiler.cache import cache_info, clear_cache
from .chain import ChainKernels, SimpleChain, SimpleChainWithLoss, add_loss, init_params, init_state, numparam, remove_loss
from .layers import (GRU, LSTM, BatchNorm, Conv, Conv1D, Dense, Dropout, Flatten, MaxPool, Parallel, Permute, Reshape,
                     SkipConnection, Slice, TemporalPatternAttention, TimeDistributed, TurboDense)
from .io import Checkpoint, load, save
from .torch_interop import from_torch, to_torch
from .many import FitResult, fit_many
from .losses import AbsoluteLoss, BinaryLogitCrossEntropyLoss, CustomLoss, HuberLoss, LogitCrossEntropyLoss, Loss, MSELoss, SquaredLoss
from .optim import SGD, Adam, AdamW, Optimizer, RMSProp
from .penalties import L1Penalty, L2Penalty
from .predict import log_softmax, predict_proba, softmax
from .train import (
    accuracy_and_loss,
    alloc_threaded_grad,
    default_batch_size,
    frozen_indices,
    train_batched,
    train_unbatched,
    valgrad,
    valgrad_with_input,
)

__all__ = [
    "AbsoluteLoss", "Activation", "Adam", "AdamW", "L1Penalty", "L2Penalty", "BatchNorm", "BinaryLogitCrossEntropyLoss", "ChainKernels", "Checkpoint", "Conv", "Conv1D", "CustomLoss", "HuberLoss", "Dense", "Dropout", "FitResult", "Flatten", "GRU", "LSTM", "MaxPool", "LogitCrossEntropyLoss", "Loss", "MSELoss", "Parallel", "Permute", "Reshape",
    "Optimizer", "RMSProp", "SGD", "SimpleChain", "SimpleChainWithLoss", "SkipConnection", "Slice", "SquaredLoss", "TemporalPatternAttention",
    "TimeDistributed", "TurboDense", "accuracy_and_loss", "add_loss", "alloc_threaded_grad", "cache_info", "clear_cache", "default_batch_size", "available_activations", "fit_many", "from_torch", "to_torch", "datasets", "ode", "schedules",
    "get_activation", "init_params", "init_state", "load", "numparam", "remove_loss", "save", "train_batched",
    "train_unbatched", "valgrad", "valgrad_with_input", "frozen_indices",
    "log_softmax", "predict_proba", "softmax",
]


def __getattr__(name):
    # smallchains.datasets (urllib, gzip, hashlib) and smallchains.ode (compiles or loads
    # the solver) are imported on first use: keeps ``import smallchains`` fast
    if name in ("datasets", "ode", "schedules"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'smallchains' has no attribute {name!r}")
