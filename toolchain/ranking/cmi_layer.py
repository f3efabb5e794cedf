"""CMI's one-layer ranking: ``rank_layer`` and its result ``CMIRanking`` (how and why: toolchain.ranking.cmi).

The kernels (exact and adaptive) are in ``cmi_estimators``; the criterion that runs this over a
network is ``toolchain.ranking.cmi``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from toolchain.errors import UserError
from toolchain.ranking.cmi_estimators import KERNELS, TIE_TOL, _Adaptive, _Exact
from toolchain.ranking.options import check_int, check_number

SATURATION_TOL = 0.01  # an entropy within 1% of ln N is saturated (docs/design/algorithms.md §5)


@dataclass
class CMIRanking:
    """Result of ``rank_layer`` for one layer of C channels."""

    order: list[int]  # all C channel indices, most informative first (greedy order)
    cmi: list[float]  # C-1 values: I(Y; R | P u S_k) after the k-th greedy addition
    cmi_total: float  # I(Y; layer | P): the CMI before any selection (k = 0)
    mi: list[float]  # C-1 values: I(Y; P u S_k)
    joint_entropy: list[float]  # C-1 values: S(P u S_k)
    p_values: list[float] | None  # permutation p-value of each tested step (stop="permutation")
    selected: int | None  # channels kept by the permutation stop (None without it)
    sigma: float | list[float]  # kernel width of the layer's channels (one per channel: adaptive)
    sigma_labels: float  # 0.0: the class-indicator kernel (adaptive)
    sigma_condition: list  # one width per conditioning map (adaptive: a list per map)
    entropy_labels: float  # S(Y)
    entropy_condition: float  # S(P) (0 when P is empty)
    entropy_all: float  # S(P u all channels)
    max_entropy: float  # ln N
    saturation_step: int | None  # first k with S(P u S_k) >= 0.99 ln N (None: never)
    tie_steps: int  # greedy steps decided by the lowest-index tie rule
    alpha: float
    gamma: float
    n: int
    kernel: str = "exact"
    seconds: float = 0.0

    @property
    def saturated(self) -> bool:
        """True when the selected set's joint entropy reaches 99% of ln N before the order ends."""
        return self.saturation_step is not None

    @property
    def widths(self) -> dict[str, Any]:
        return {"channels": self.sigma, "labels": self.sigma_labels, "condition": self.sigma_condition}

    def to_info(self) -> dict[str, Any]:
        """JSON-able summary (for ``LayerRanking.info``)."""
        return {
            "cmi": [float(v) for v in self.cmi],
            "cmi_total": float(self.cmi_total),
            "mi": [float(v) for v in self.mi],
            "joint_entropy": [float(v) for v in self.joint_entropy],
            "p_values": None if self.p_values is None else [float(p) for p in self.p_values],
            "selected": self.selected,
            "widths": self.widths,
            "kernel": self.kernel,
            "entropy_labels": float(self.entropy_labels),
            "entropy_condition": float(self.entropy_condition),
            "entropy_all": float(self.entropy_all),
            "max_entropy": float(self.max_entropy),
            "saturated": self.saturated,
            "saturation_step": self.saturation_step,
            "tie_steps": int(self.tie_steps),
            "alpha": float(self.alpha),
            "gamma": float(self.gamma),
            "samples": int(self.n),
            "seconds": round(float(self.seconds), 4),
        }


def _as_maps(x: Any, name: str, n: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim < 2:
        raise UserError(f"{name} must have shape (N, C, ...), got {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise UserError(f"{name} has {t.shape[0]} samples, expected {n}")
    if not t.is_floating_point() or t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t.reshape(t.shape[0], t.shape[1], -1)


@torch.no_grad()
def rank_layer(features, labels, *, num_classes=10, alpha=1.01, gamma=5.0, condition=(), stop=None,
               permutations=100, eta=0.05, seed=0, device=None, kernel="exact", target=None) -> CMIRanking:
    """Rank the C channels of one layer by greedy CMI selection (docs/design/algorithms.md §2).

    ``features``: (N, C, H, W) post-BN-ReLU maps (tensor or array); ``labels``: (N,) ints in
    ``[0, num_classes)``; ``condition``: maps (N, Ci, Hi, Wi) of previously pruned layers (their
    kept channels), every channel of which joins the conditioning set P. ``kernel="exact"``
    (default): the paper's Gaussian widths ``gamma * N^(-1/(4+d))`` (d = H*W, K for the labels)
    and Hadamard products; ties in the greedy argmax (within ``TIE_TOL`` nats) go to the lowest
    channel index. ``kernel="adaptive"``: median-heuristic widths, a non-collapsing set kernel
    and ties broken by single-channel MI (see ``_Adaptive``; ``gamma`` is unused). With
    ``stop="permutation"`` every step is tested with ``permutations`` row permutations of the
    added channel until the first step with ``p >= eta``; ``selected`` is then the number of
    channels before it, and the greedy order is completed without further tests. Runs on
    ``device`` (default: the features' device); float64 throughout. ``target`` (adaptive
    kernel only): maps (N, ...) to preserve instead of the labels, e.g. the next layer's
    response (a Gaussian kernel with the median width on the whole response).
    """
    t0 = time.perf_counter()
    x, y, cond, dev, num_classes, alpha, gamma, permutations, eta = _checked_inputs(
        features, labels, num_classes, alpha, gamma, condition, stop, permutations, eta, device, kernel, target)
    n, c, _ = x.shape
    if kernel == "exact":
        st = _Exact(x, cond, y, num_classes, alpha, gamma, dev)
    else:
        st = _Adaptive(x, cond, y, num_classes, alpha, gamma, dev,
                       target=None if target is None else _as_maps(target, "target", n))
    ceiling = math.log(n)
    steps = _greedy(st, c, ceiling, stop, permutations, eta, seed)
    wd = st.widths()
    return CMIRanking(
        **steps, cmi_total=st.i_all - st.i_p, sigma=wd["channels"], sigma_labels=wd["labels"],
        sigma_condition=wd["condition"], entropy_labels=st.s_y, entropy_condition=st.s_p, entropy_all=st.s_all,
        max_entropy=ceiling, alpha=alpha, gamma=gamma, n=n, kernel=kernel, seconds=time.perf_counter() - t0)


def _checked_inputs(features, labels, num_classes, alpha, gamma, condition, stop, permutations, eta, device,
                    kernel, target):
    """``rank_layer``'s arguments checked (one-line UserErrors) and as tensors on the device."""
    x = _as_maps(features, "features")
    n = x.shape[0]
    if n < 2:
        raise UserError(f"rank_layer needs at least 2 samples, got {n}")
    num_classes = check_int("num_classes", num_classes, 1)
    alpha = check_number("alpha", alpha, 0.0)
    gamma = check_number("gamma", gamma, 0.0)
    if stop not in (None, "permutation"):
        raise UserError(f"stop must be None or 'permutation', got {stop!r}")
    if kernel not in KERNELS:
        raise UserError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if stop == "permutation":
        permutations = check_int("permutations", permutations, 1)
        eta = check_number("eta", eta, 0.0, 1.0)
    dev = torch.device(device) if device is not None else x.device
    y = torch.as_tensor(labels).reshape(-1).to(dev)
    if y.shape[0] != n:
        raise UserError(f"labels has {y.shape[0]} entries, features {n} samples")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise UserError("labels must be integers")
    y = y.long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    cond = [_as_maps(m, f"condition[{i}]", n) for i, m in enumerate(condition)]

    if target is not None and kernel != "adaptive":
        raise UserError("a target other than the labels needs kernel='adaptive' (cmi: --preserve next with "
                        "--kernel adaptive)")
    return x, y, cond, dev, num_classes, alpha, gamma, permutations, eta


def _greedy(st, c: int, ceiling: float, stop, permutations: int, eta: float, seed: int) -> dict[str, Any]:
    """The greedy selection over the kernel state ``st`` (``_Exact`` or ``_Adaptive``): ``CMIRanking``'s
    per-step fields."""
    gen = torch.Generator().manual_seed(int(seed))
    rows = list(range(c))  # rows[r] = channel held in row r of the store; rows[:left] are candidates
    left = c
    order: list[int] = []
    cmi: list[float] = []
    mi: list[float] = []
    joint: list[float] = []
    p_values: list[float] | None = [] if stop == "permutation" else None
    selected: int | None = None
    tie_steps = 0
    saturation_step = None
    secondary = st.secondary

    for k in range(1, c):
        h, hy = st.evaluate(left)
        m = st.s_y + h - hy
        best = float(m.max())
        tied = torch.nonzero(m >= best - TIE_TOL).flatten().tolist()
        if len(tied) == 1:
            r = tied[0]
        elif secondary is None:
            r = min(tied, key=lambda t: rows[t])
        else:
            r = min(tied, key=lambda t: (-secondary[rows[t]], rows[t]))
        tie_steps += len(tied) > 1
        s = rows[r]
        joint_k = float(h[r])
        order.append(s)
        mi.append(float(m[r]))
        joint.append(joint_k)
        cmi.append(st.i_all - float(m[r]))
        if saturation_step is None and joint_k >= (1.0 - SATURATION_TOL) * ceiling:
            saturation_step = k
        if p_values is not None and selected is None:
            p = st.permutation_p(s, cmi[-1], permutations, gen)
            p_values.append(p)
            if p >= eta:
                selected = k - 1
        st.add(r)
        last = left - 1  # move the chosen row behind the candidates
        if r != last:
            st.swap(r, last)
            rows[r], rows[last] = rows[last], rows[r]
        left -= 1
    order.append(rows[0])
    if p_values is not None and selected is None:
        selected = c - 1 if c > 1 else 1

    return {"order": order, "cmi": cmi, "mi": mi, "joint_entropy": joint, "p_values": p_values,
            "selected": selected, "saturation_step": saturation_step, "tie_steps": int(tie_steps)}
