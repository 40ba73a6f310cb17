"""Published small networks, built from the library's layers.

Each function returns a :class:`~smallchains.SimpleChain`; ``param_views`` of it names
every array, and ``bench/`` holds a torch eager twin of each model that loads the same
parameters.
"""

from __future__ import annotations

from .chain import SimpleChain
from .layers import (GRU, LSTM, Conv1D, Dense, Flatten, Parallel, Permute, Reshape, Slice,
                     TemporalPatternAttention, TimeDistributed)


def lstnet(n_series, window, *, conv_filters=2, conv_width=3, hidden=3, skip=4, skip_hidden=3,
           highway=4, target=0, block_size=128, **chain_options) -> SimpleChain:
    """LSTNet (Lai, Chang, Yang and Liu, "Modeling Long- and Short-Term Temporal Patterns
    with Deep Neural Networks", SIGIR 2018), one output: the next value of series
    ``target``. FluxArchitectures.jl's ``LSTnet`` is the same network, except that its
    recurrent cells carry state from window to window; here each sample is one window and
    the recurrences run over its time steps (the paper's meaning).

    Input ``(window, n_series)`` per sample. The network::

        conv  = Conv1D(conv_filters, conv_width, "relu")           sequence (Tc, conv_filters),
                Tc = window - conv_width + 1 (a convolution over the whole window of series)
        rec   = GRU(hidden)(conv)                                   last state, (hidden,)
        skip  = GRU(skip_hidden) over each of the `skip` interleaved sub-sequences of the
                last (Tc // skip) * skip conv steps (t, t + skip, ...), weights shared,
                last states concatenated                            (skip * skip_hidden,)
        y     = Dense(1)([rec, skip]) + Dense(1)(x[-highway:, target])   (the highway)

    Parameters
    ----------
    n_series, window : int
        Input series ``F`` and time steps ``T`` per window.
    conv_filters, conv_width, hidden, skip, skip_hidden, highway : int
        The sizes above; ``skip <= Tc``. Defaults: the FluxBench benchmark's conv 2 and
        recurrent 3, with a skip of 4 steps and a 4-step highway (our choice: FluxBench's
        skip of 60 is longer than its window of 10).
    target : int
        The series the highway reads (and the output forecasts).
    block_size : int, default 128
        Samples per compiled block (:class:`SimpleChain`'s ``block_size``): this
        network's layers are tiny, and 128 ran its training step 2x faster than the
        automatic 16 (Zen 3, batch 500).
    **chain_options
        Passed to :class:`SimpleChain` (``kernels=``, ``registers=``).

    Returns
    -------
    SimpleChain
        Output ``(1,)``. One :class:`Parallel` (``"sum"`` of the network and the highway),
        so ``chain.param_views(p)[0]`` holds every array: ``"0.0.W"`` the convolution
        ``(conv_filters, conv_width, n_series)``, ``"0.1.0.0.weight_ih"`` ... the GRU,
        ``"0.1.1.3.weight_ih"`` ... the skip-GRU, ``"0.2.W"`` the output layer, ``"1.1.W"``
        the highway.

    Raises
    ------
    ValueError
        Sizes that do not fit (``conv_width > window``, ``skip > Tc``, ``highway > window``).
    """
    T, F = int(window), int(n_series)
    Tc = T - conv_width + 1
    if Tc < 1:
        raise ValueError(f"lstnet: conv_width {conv_width} is longer than the window {T}")
    if not 1 <= skip <= Tc:
        raise ValueError(f"lstnet: skip must be in 1..{Tc} (the conv output length), got {skip}")
    if not 1 <= highway <= T:
        raise ValueError(f"lstnet: highway must be in 1..{T}, got {highway}")
    n = Tc // skip
    crop = (Slice(slice(Tc - n * skip, None)),) if n * skip < Tc else ()
    skip_branch = crop + (Reshape((n, skip, conv_filters)), Permute((1, 0, 2)),
                          TimeDistributed(GRU(skip_hidden)), Flatten())
    network = (Conv1D(conv_filters, conv_width, "relu"),
               Parallel("concat", GRU(hidden), skip_branch), Dense(1))
    highway_branch = (Slice(slice(T - highway, None), target), Dense(1))
    return SimpleChain((T, F), Parallel("sum", network, highway_branch), block_size=block_size,
                       **chain_options)


def tpa_lstm(n_series, window, *, hidden=10, layers=2, filters=32, n_out=1, block_size=64,
             **chain_options) -> SimpleChain:
    """TPA-LSTM (Shih, Sun and Lee, "Temporal Pattern Attention for Multivariate Time
    Series Forecasting", Machine Learning 108, 2019; FluxArchitectures.jl's ``TPALSTM``)::

        TimeDistributed(Dense(hidden, "relu"))          embedding of each step, (T, hidden)
        LSTM(hidden, return_sequences=True) x layers    stacked, (T, hidden)
        TemporalPatternAttention(filters)               (hidden,)
        Dense(n_out)

    Parameters
    ----------
    n_series, window : int
        Input series ``F`` and time steps ``T >= 2`` per window.
    hidden, layers, filters : int
        Defaults: the FluxBench benchmark's sizes (hidden 10, 2 LSTM layers, 32 filters).
    n_out : int
        Outputs (the next value of ``n_out`` series).
    block_size : int or None, default 64
        :class:`SimpleChain`'s ``block_size`` (a multiple of two vectors, so the LSTM and
        attention get their register tiles): measured on an AVX-512 Xeon with those
        tiles, the benchmark's training step (batch 300) took 659 / 419 us at 1 / 2
        threads at 64, 820 / 410 at 32, 864 / 598 at 128, 758 / 425 at 160 (the
        workspace of 128 lanes no longer stays in L2, and 300 samples fill 3 blocks).
    **chain_options
        Passed to :class:`SimpleChain`.

    Returns
    -------
    SimpleChain
        Input ``(window, n_series)``, output ``(n_out,)``. Parameters, in
        ``param_views`` order: the embedding ``W``, ``b``; each LSTM's ``weight_ih``,
        ``weight_hh``, ``bias_ih``, ``bias_hh`` (torch's ``nn.LSTM(num_layers=layers)``
        ``_l0``, ``_l1``, ... arrays); the attention's ``C``, ``c``, ``W_a``, ``W_h``,
        ``W_v``; the output ``W``, ``b``.
    """
    recurrent = [LSTM(hidden, return_sequences=True) for _ in range(layers)]
    return SimpleChain((int(window), int(n_series)), TimeDistributed(Dense(hidden, "relu")), *recurrent,
                       TemporalPatternAttention(filters), Dense(n_out), block_size=block_size,
                       **chain_options)
