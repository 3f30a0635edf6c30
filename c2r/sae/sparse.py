"""The two kernels of a k-sparse training step, on the selected (row, latent) entries instead of dense ``[B, F]``.

A TopK-family SAE keeps N = B·k entries of its ``[B, F]`` pre-activations. Only the encoder's forward has to be
dense (to choose them); the rest of the step costs O(N·d):

- :func:`entries_of_pre_acts`: the kept pre-activations, whose backward sends the N gradients straight to
  ``W_enc`` (``xᵀ·G`` as a sparse product), ``b_enc`` (column sums) and ``b_dec`` — instead of autograd's dense
  ``[B, F]`` gradient and ``[d, B] × [B, F]`` product;
- :func:`decode`: ``Σ value · W_dec[latent]`` per row (``embedding_bag``), whose backward reads only the
  selected decoder rows.

Both are pure PyTorch (CPU and CUDA). Inside :func:`dense_reference` they run the plain dense computation
instead; the tests check that both paths agree in every loss and gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

_dense_reference = False


@contextmanager
def dense_reference() -> Iterator[None]:
    """Run :func:`entries_of_pre_acts` and :func:`decode` as plain dense autograd (the reference for tests)."""
    global _dense_reference
    previous, _dense_reference = _dense_reference, True
    try:
        yield
    finally:
        _dense_reference = previous


def entries_of_pre_acts(
    x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre_acts: Tensor, rows: Tensor, latents: Tensor
) -> Tensor:
    """``pre_acts[rows, latents]`` (``[N]``) for ``pre_acts = (x - b_dec) @ W_enc + b_enc`` computed without a
    graph, differentiable in ``b_dec``, ``W_enc`` and ``b_enc`` at O(N·d) (the dense backward is O(B·F·d))."""
    if _dense_reference:
        return ((x - b_dec) @ W_enc + b_enc)[rows, latents]
    return _EntriesOfPreActs.apply(x, b_dec, W_enc, b_enc, pre_acts, rows, latents)


class _EntriesOfPreActs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, pre_acts, rows, latents):
        ctx.save_for_backward(x, b_dec, W_enc, rows, latents)
        return pre_acts[rows, latents]

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, b_dec, W_enc, rows, latents = ctx.saved_tensors
        grad = grad.to(W_enc.dtype)  # under autocast the entries are bf16; the parameters' gradients are not
        grad_b_enc = grad.new_zeros(W_enc.shape[1]).index_add_(0, latents, grad)
        grad_W_enc = None
        if ctx.needs_input_grad[2]:
            inputs = (x - b_dec).to(W_enc.dtype)
            grad_W_enc = _transposed_sparse(rows, latents, grad, x.shape[0], W_enc.shape[1]).matmul(inputs).t()
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[1] else None
        return None, grad_b_dec, grad_W_enc, grad_b_enc, None, None, None


def _transposed_sparse(rows: Tensor, latents: Tensor, values: Tensor, n_rows: int, n_latents: int) -> Tensor:
    """The ``[F, B]`` sparse matrix with ``values`` at ``(latents, rows)`` (CSR: a latent's entries together)."""
    order = latents.argsort()
    # crow[i]: the number of entries of latents < i (searchsorted, unlike bincount, reads nothing back on CUDA).
    crow = torch.searchsorted(latents[order], torch.arange(n_latents + 1, device=latents.device))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, rows[order], values[order], (n_latents, n_rows), check_invariants=False)


def decode(rows: Tensor, latents: Tensor, values: Tensor, n_rows: int, W_dec: Tensor) -> Tensor:
    """``[n_rows, d]``: row r is ``Σ values[e] · W_dec[latents[e]]`` over the entries e with ``rows[e] == r``;
    ``rows`` must be sorted (each row's entries together). No bias."""
    if _dense_reference:
        codes = values.new_zeros(n_rows, W_dec.shape[0]).index_put((rows, latents), values, accumulate=True)
        return codes @ W_dec
    offsets = torch.searchsorted(rows, torch.arange(n_rows, device=rows.device))
    return F.embedding_bag(latents, W_dec, offsets, mode="sum", per_sample_weights=values.to(W_dec.dtype))
