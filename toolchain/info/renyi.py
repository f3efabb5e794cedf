"""Matrix-based Renyi alpha-order entropy, mutual information and conditional MI.

Pure tensor math (torch, CPU or CUDA), see ``docs/design/algorithms.md`` §1. Every function is
batched over leading dimensions and broadcasts them: a "Gram" is any tensor of shape
``(..., N, N)`` holding symmetric positive semi-definite matrices over the same N samples.

Conventions:

- ``gaussian_gram`` returns the *normalised* Gram ``A = K / N`` (unit trace); pass
  ``normalize=False`` for the raw kernel ``K`` (diagonal 1).
- Every entropy function normalises its input to unit trace itself, so the Hadamard product of
  several Grams can be passed as is (``N * (A o B)`` and ``A o B`` give the same entropy).
- Natural logarithms throughout: ``0 <= S <= ln N``.
- Eigenvalues are computed in float64 by ``eigvalsh`` (one batched call: ``torch.linalg.eigvalsh``
  on CUDA, the same LAPACK routine through NumPy on the CPU); tiny negative round-off is
  clamped at 0. ``alpha == 2`` uses ``sum(lambda^2) = ||A||_F^2`` and
  needs no eigenvalues; ``alpha == 1`` is the von Neumann entropy.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = [
    "conditional_mutual_information",
    "eigvalsh",
    "entropy_from_eigenvalues",
    "gaussian_gram",
    "gram_from_sq_distances",
    "is_saturated",
    "joint_entropy",
    "joint_gram",
    "label_gram",
    "median_sigma",
    "mutual_information",
    "normalize_gram",
    "paper_sigma",
    "renyi_entropy",
    "squared_distances",
]


def paper_sigma(n: int, d: int, gamma: float = 5.0) -> float:
    """Kernel width of the CMI paper's released code: ``gamma * n ** (-1 / (4 + d))``.

    ``n`` samples, ``d`` the dimension of one sample of the variable (H*W for one channel's
    feature map, K for one-hot labels).
    """
    if n < 1 or d < 1 or gamma <= 0:
        raise ValueError(f"paper_sigma needs n >= 1, d >= 1, gamma > 0 (got n={n}, d={d}, gamma={gamma})")
    return float(gamma) * float(n) ** (-1.0 / (4.0 + d))


def squared_distances(x: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``||x_i - x_j||^2``: ``(..., N, D) -> (..., N, N)``.

    Computed in ``dtype`` (float64 by default) through one batched matmul; the result is
    symmetrised, clamped at 0 and has an exact zero diagonal.
    """
    x = x.to(dtype)
    sq = (x * x).sum(-1)
    d = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (x @ x.transpose(-1, -2))
    d = 0.5 * (d + d.transpose(-1, -2))
    d.clamp_(min=0.0)
    d.diagonal(dim1=-2, dim2=-1).zero_()
    return d


def _as_width(sigma: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor | float:
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(device=ref.device, dtype=ref.dtype)
        return s[..., None, None] if s.ndim else s
    return float(sigma)


def gram_from_sq_distances(d2: torch.Tensor, sigma: float | torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Gaussian Gram ``exp(-d2 / (2 sigma^2))`` from squared distances ``(..., N, N)``.

    ``sigma`` is a float or a tensor over the leading dims (one width per matrix).
    With ``normalize`` the result is divided by N (unit trace, as the diagonal is 1).
    """
    s = _as_width(sigma, d2)
    k = torch.exp(-d2 / (2.0 * s * s))
    return k / d2.shape[-1] if normalize else k


def gaussian_gram(x: torch.Tensor, sigma: float | torch.Tensor, *, normalize: bool = True,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Gaussian Gram of samples ``x`` ``(..., N, D)``: ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))``.

    Returns ``(..., N, N)`` in ``dtype``, normalised to unit trace (``K / N``) unless
    ``normalize=False``.
    """
    return gram_from_sq_distances(squared_distances(x, dtype=dtype), sigma, normalize=normalize)


def label_gram(labels: torch.Tensor, num_classes: int, sigma: float, *, normalize: bool = True,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Gaussian Gram of one-hot labels ``(N,)``: 1 for equal labels, ``exp(-1/sigma^2)`` otherwise."""
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)
    return gaussian_gram(onehot, sigma, normalize=normalize, dtype=dtype)


def median_sigma(d2: torch.Tensor) -> torch.Tensor:
    """Median heuristic width per matrix: ``sqrt(median_{i<j} d2_ij / 2)`` over the leading dims.

    With this width the median pair of samples has similarity ``exp(-1/2)``. Returns a tensor
    of shape ``d2.shape[:-2]``; 0 where all samples coincide (callers should guard that).
    """
    n = d2.shape[-1]
    iu = torch.triu_indices(n, n, offset=1, device=d2.device)
    off = d2[..., iu[0], iu[1]]
    return torch.sqrt(off.median(dim=-1).values / 2.0)


def normalize_gram(k: torch.Tensor) -> torch.Tensor:
    """Divide each matrix by its trace (unit trace)."""
    tr = k.diagonal(dim1=-2, dim2=-1).sum(-1)
    return k / tr[..., None, None]


def entropy_from_eigenvalues(lam: torch.Tensor, alpha: float) -> torch.Tensor:
    """Renyi alpha-entropy of a spectrum ``(..., N)``.

    Negative round-off is clamped at 0, eigenvalues below ``N * eps * max`` count as 0, and the
    spectrum is normalised to sum 1.
    """
    _check_alpha(alpha)
    lam = lam.clamp(min=0.0)
    # eigenvalues at round-off level are zeros (they would dominate for alpha < 1)
    tiny = lam.amax(-1, keepdim=True) * (lam.shape[-1] * torch.finfo(lam.dtype).eps)
    lam = torch.where(lam > tiny, lam, torch.zeros_like(lam))
    lam = lam / lam.sum(-1, keepdim=True)
    if alpha == 1.0:
        return -torch.special.xlogy(lam, lam).sum(-1)
    return torch.log((lam**alpha).sum(-1)) / (1.0 - alpha)


def _check_alpha(alpha: float) -> None:
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")


def renyi_entropy(a: torch.Tensor, alpha: float = 1.01) -> torch.Tensor:
    """Matrix-based Renyi alpha-entropy ``1/(1-alpha) ln sum_i lambda_i^alpha`` of ``(..., N, N)``.

    The input is normalised to unit trace first. ``alpha == 2`` is computed as
    ``-ln(||A||_F^2 / tr(A)^2)`` (O(N^2), no eigenvalues); any other ``alpha > 0`` through
    float64 eigenvalues (one batched ``eigvalsh`` call), ``alpha == 1`` as von Neumann
    ``-sum lambda ln lambda``. Returns a float64 tensor of shape ``a.shape[:-2]``.
    """
    _check_alpha(alpha)
    a = a.to(torch.float64)
    if alpha == 2.0:
        tr = a.diagonal(dim1=-2, dim2=-1).sum(-1)
        return -torch.log((a * a).sum((-2, -1)) / (tr * tr))
    return entropy_from_eigenvalues(eigvalsh(a), alpha)


_BLAS: dict = {"controller": None, "users": 0, "saved": None}
_BLAS_LOCK = threading.Lock()


@contextlib.contextmanager
def _single_threaded_blas():
    """NumPy's BLAS limited to one thread while any caller is inside (re-entrant across threads)."""
    with _BLAS_LOCK:
        if _BLAS["controller"] is None:
            from threadpoolctl import ThreadpoolController

            _BLAS["controller"] = ThreadpoolController()
        if _BLAS["users"] == 0:
            _BLAS["saved"] = _BLAS["controller"].limit(limits=1, user_api="blas")
        _BLAS["users"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS["users"] -= 1
            if _BLAS["users"] == 0:
                _BLAS["saved"].restore_original_limits()
                _BLAS["saved"] = None


def _cpu_eigvalsh(a: np.ndarray, workers: int) -> np.ndarray:
    with _single_threaded_blas():
        if a.ndim < 3 or workers < 2 or len(a) < 2:
            return np.linalg.eigvalsh(a)
        parts = np.array_split(a, min(workers, len(a)))
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            return np.concatenate(list(pool.map(np.linalg.eigvalsh, parts)))


def eigvalsh(a: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of symmetric matrices ``(..., N, N)`` in float64, one batched call.

    ``torch.linalg.eigvalsh`` on CUDA. On the CPU the same LAPACK routine (syevd) is called
    through NumPy with single-threaded BLAS, the batch split over ``torch.get_num_threads()``
    worker threads: multi-threaded LAPACK inside one small (256 x 256) decomposition was
    measured 10-40x slower on a shared 2-core machine (torch's MKL and NumPy's OpenBLAS alike).
    """
    a = a.to(torch.float64)
    if a.device.type == "cpu":
        arr = a.detach().contiguous().numpy()
        flat = arr.reshape(-1, *arr.shape[-2:]) if arr.ndim > 2 else arr
        lam = _cpu_eigvalsh(flat, torch.get_num_threads())
        return torch.from_numpy(np.ascontiguousarray(lam.reshape(*arr.shape[:-1])))
    return torch.linalg.eigvalsh(a)


def joint_gram(*grams: torch.Tensor) -> torch.Tensor:
    """Gram of the joint variable: the Hadamard product of the Grams, renormalised to unit trace.

    For normalised Gaussian Grams that is ``N^(m-1) * (A_1 o ... o A_m)``. Leading dims broadcast.
    """
    if not grams:
        raise ValueError("joint_gram needs at least one Gram")
    out = grams[0].to(torch.float64)
    for g in grams[1:]:
        out = out * g.to(torch.float64)
    return normalize_gram(out)


def joint_entropy(*grams: torch.Tensor, alpha: float = 1.01) -> torch.Tensor:
    """``S_alpha(X_1, ..., X_m)`` from the variables' Grams (Hadamard product)."""
    return renyi_entropy(joint_gram(*grams), alpha)


def _joint(grams: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(grams, torch.Tensor):
        return grams.to(torch.float64)
    return joint_gram(*grams)


def mutual_information(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor | Sequence[torch.Tensor],
                       alpha: float = 1.01) -> torch.Tensor:
    """``I(X;Y) = S(X) + S(Y) - S(X,Y)``.

    ``a`` and ``b`` are Grams (or sequences of Grams, i.e. sets of variables, combined by
    ``joint_gram``). Estimates can be slightly negative; they are returned as they are.
    """
    ga, gb = _joint(a), _joint(b)
    return renyi_entropy(ga, alpha) + renyi_entropy(gb, alpha) - renyi_entropy(ga * gb, alpha)


def conditional_mutual_information(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor | Sequence[torch.Tensor],
                                   c: torch.Tensor | Sequence[torch.Tensor] | None = None,
                                   alpha: float = 1.01) -> torch.Tensor:
    """``I(X;Y|Z) = S(X,Z) + S(Y,Z) - S(X,Y,Z) - S(Z)``; plain MI when ``c`` is None or empty."""
    if c is None or (not isinstance(c, torch.Tensor) and len(c) == 0):
        return mutual_information(a, b, alpha)
    ga, gb, gc = _joint(a), _joint(b), _joint(c)
    return (renyi_entropy(ga * gc, alpha) + renyi_entropy(gb * gc, alpha)
            - renyi_entropy(ga * gb * gc, alpha) - renyi_entropy(gc, alpha))


def is_saturated(entropy: torch.Tensor | float, n: int, tol: float = 0.01) -> torch.Tensor | bool:
    """True where an entropy is within ``tol`` (relative) of its ceiling ``ln n`` (docs/design/algorithms.md §5)."""
    ceiling = math.log(n)
    if isinstance(entropy, torch.Tensor):
        return entropy >= (1.0 - tol) * ceiling
    return bool(entropy >= (1.0 - tol) * ceiling)
