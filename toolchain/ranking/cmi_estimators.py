"""The two kernel modes of CMI's one-layer ranking (``cmi_layer.rank_layer``; how and why: toolchain.ranking.cmi).

Both keep the layer's channels in one store and the conditioning set P plus the selection S as
one running quantity, so a greedy step is one batched evaluation of every remaining candidate
(``evaluate``) and one update (``add``); ``permutation_p`` is the permutation stopping test.
"""

from __future__ import annotations

from typing import Any

import torch

from toolchain.info.renyi import label_gram, paper_sigma, renyi_entropy, squared_distances

TIE_TOL = 1e-10  # nats: candidates within this of the best MI count as tied (lowest index wins)
_CHUNK_ELEMS = 1 << 23  # float64 elements per temporary chunk (64 MiB)

KERNELS = ("exact", "adaptive")


def _packed(m: torch.Tensor, iu: torch.Tensor) -> torch.Tensor:
    return m[..., iu[0], iu[1]]


def _unpack(p: torch.Tensor, iu: torch.Tensor, n: int, diag: float) -> torch.Tensor:
    """Symmetric (N, N) matrix from its packed upper triangle (pairs i < j) and a constant diagonal."""
    g = torch.zeros(n, n, dtype=p.dtype, device=p.device)
    g[iu[0], iu[1]] = p
    g = g + g.T
    g.diagonal().fill_(diag)
    return g


def _channel_chunks(maps: torch.Tensor, device: torch.device):
    """Squared-distance matrices (c, N, N) of the channels of ``maps`` (N, C, d), in chunks."""
    n, c, d = maps.shape
    step = max(1, _CHUNK_ELEMS // max(n * max(d, n), 1))
    for a in range(0, c, step):
        yield a, squared_distances(maps[:, a:a + step].to(device).transpose(0, 1))


class _Exact:
    """The paper's kernels: Gaussian, widths ``gamma N^(-1/(4+d))``; a set's Gram is the Hadamard
    product of its channels' Grams (a running product), the labels' Gram a Gaussian on one-hot codes.

    alpha = 2 keeps the squared kernels packed (pairs i < j) and the running Gram G packed: every
    kernel has a unit diagonal, so G keeps its diagonal 1/N, and with w = 2 G_ij^2,
    ``||G o K_j||_F^2 = sum_i G_ii^2 + <w, K_j^2>`` for all candidates in one matrix product.
    """

    def __init__(self, x, cond, y, num_classes, alpha, gamma, dev):
        n, c, d = x.shape
        self.x, self.n, self.c, self.alpha, self.dev = x, n, c, alpha, dev
        self.ent = lambda a: renyi_entropy(a, alpha)
        self.sigma = paper_sigma(n, d, gamma)
        self.sigma_y = paper_sigma(n, num_classes, gamma)
        self.sigma_cond = [paper_sigma(n, m.shape[2], gamma) for m in cond]
        self.k_y = label_gram(y, num_classes, self.sigma_y, normalize=False)  # unit diagonal
        f64 = torch.float64
        self.e_p = torch.zeros(n, n, dtype=f64, device=dev)
        for m, sig in zip(cond, self.sigma_cond):
            for _, dist in _channel_chunks(m, dev):
                self.e_p += dist.sum(0) / (2.0 * sig * sig)
        self.fast = alpha == 2.0
        self.iu = iu = torch.triu_indices(n, n, offset=1, device=dev)
        self.e_all = torch.zeros(n, n, dtype=f64, device=dev)
        self.store = torch.empty((c, iu.shape[1]) if self.fast else (c, n, n), dtype=f64, device=dev)
        for a, dist in _channel_chunks(x, dev):
            e = dist / (2.0 * self.sigma * self.sigma)
            del dist
            self.e_all += e.sum(0)
            self.store[a:a + e.shape[0]] = torch.exp(-2.0 * _packed(e, iu)) if self.fast else torch.exp(-e)
            del e
        g = torch.exp(-self.e_p)
        g /= g.diagonal().sum()  # unit-trace Gram of P (all-ones / N when P is empty)
        ent, k_y = self.ent, self.k_y
        self.s_y = float(ent(k_y))
        self.s_p = float(ent(g))
        self.i_p = self.s_y + self.s_p - float(ent(g * k_y))
        full = torch.exp(-(self.e_all + self.e_p))
        self.s_all = float(ent(full))
        self.i_all = self.s_y + self.s_all - float(ent(full * k_y))
        del full
        if self.fast:
            self.gp = _packed(g, iu).contiguous()
            self.kyp = _packed(k_y, iu).contiguous()
            self.diag2 = float((g.diagonal() ** 2).sum())
            self.w = torch.empty(2, iu.shape[1], dtype=f64, device=dev)
        else:
            self.g = g
        self.secondary = None  # exact mode: ties go to the lowest index

    def widths(self) -> dict[str, Any]:
        return {"channels": self.sigma, "labels": self.sigma_y, "condition": list(self.sigma_cond)}

    def evaluate(self, left: int) -> tuple[torch.Tensor, torch.Tensor]:
        """S(P u S u {j}) and S(Y, P u S u {j}) for the candidates in rows [0, left), on the CPU."""
        if self.fast:
            w = self.w
            torch.mul(self.gp, self.gp, out=w[0])
            torch.mul(self.gp, self.kyp, out=w[1])
            w[1].square_()
            w.mul_(2.0)
            vals = self.store[:left] @ w.T
            vals += self.diag2
            vals = (-torch.log(vals)).cpu()
            return vals[:, 0], vals[:, 1]
        hs, hys = [], []
        chunk = max(1, _CHUNK_ELEMS // (self.n * self.n))
        for a in range(0, left, chunk):
            prod = self.g * self.store[a:min(a + chunk, left)]
            hs.append(self.ent(prod))
            hys.append(self.ent(prod * self.k_y))
        return torch.cat(hs).cpu(), torch.cat(hys).cpu()

    def add(self, r: int) -> None:
        if self.fast:
            self.gp *= self.store[r].sqrt()  # K_s = sqrt(K_s^2): no recomputation
        else:
            self.g = self.g * self.store[r]
            self.g /= self.g.diagonal().sum()

    def swap(self, r: int, last: int) -> None:
        self.store[[r, last]] = self.store[[last, r]]

    def permutation_p(self, ch: int, cmi_true: float, permutations: int, gen: torch.Generator) -> float:
        """Call before ``add``: the running Gram is still that of P u S without the channel."""
        e_s = squared_distances(self.x[:, ch].to(self.dev).unsqueeze(0))[0] / (2.0 * self.sigma * self.sigma)
        g_prev = _unpack(self.gp, self.iu, self.n, 1.0 / self.n) if self.fast else self.g
        k_rest = torch.exp(-(self.e_all + self.e_p - e_s))
        return _permutation_p(torch.exp(-e_s), lambda kp: g_prev * kp, lambda kp: k_rest * kp, self.k_y,
                              self.s_y, cmi_true, permutations, gen, self.ent)


class _Adaptive:
    """Data-adaptive kernels (docs/design/algorithms.md §5, point 2): no collapse as the set grows.

    Channel j: ``D~_j = D_j / median_{i<k} D_j`` (its width is the median heuristic,
    ``sigma_j = sqrt(median / 2)``); a set Z of channels (conditioning channels included) has the
    kernel ``exp(-mean_{c in Z} D~_c)``: running sums of normalised distances instead of running
    products, so the kernel of a growing set stays on the same scale. Labels: the class-indicator
    kernel (different classes are orthogonal). The chain rule holds as in the exact mode (the
    kernel of R u P u S is that of the whole layer). Ties are broken by the single-channel MI
    with the labels, then by index.
    """

    def __init__(self, x, cond, y, num_classes, alpha, gamma, dev, target=None):
        n, c, _ = x.shape
        self.x, self.n, self.c, self.alpha, self.dev = x, n, c, alpha, dev
        self.ent = lambda a: renyi_entropy(a, alpha)
        f64 = torch.float64
        self.fast = alpha == 2.0
        self.iu = iu = torch.triu_indices(n, n, offset=1, device=dev)
        if target is None:  # the labels: the class-indicator kernel
            self.k_y = (y[:, None] == y[None, :]).to(f64)
        else:  # a response (e.g. the next layer's): Gaussian on all of it, median width
            dist = squared_distances(target.reshape(n, -1).to(dev).unsqueeze(0))[0]
            self.k_y = torch.exp(-dist / self._normalise(dist.unsqueeze(0))[1].clamp_min(1e-300)[0])
        self.same = _packed(self.k_y, iu).square().contiguous()  # squared target kernel over pairs
        self.t_p = torch.zeros(n, n, dtype=f64, device=dev)
        self.n_p = 0
        self.sigma_cond = []
        for m in cond:
            sig = []
            for _, dist in _channel_chunks(m, dev):
                dt, med = self._normalise(dist)
                self.t_p += dt.sum(0)
                sig += med.div(2).sqrt().tolist()
            self.n_p += m.shape[1]
            self.sigma_cond.append(sig)
        self.t_all = torch.zeros(n, n, dtype=f64, device=dev)
        self.store = torch.empty((c, iu.shape[1]) if self.fast else (c, n, n), dtype=f64, device=dev)
        self.medians = torch.empty(c, dtype=f64)
        for a, dist in _channel_chunks(x, dev):
            dt, med = self._normalise(dist)
            del dist
            self.medians[a:a + len(med)] = med.cpu()
            self.t_all += dt.sum(0)
            self.store[a:a + dt.shape[0]] = _packed(dt, iu) if self.fast else dt
            del dt
        ent, k_y = self.ent, self.k_y
        self.s_y = float(ent(k_y))
        kz = self._kernel(self.t_p, self.n_p)
        self.s_p = float(ent(kz))
        self.i_p = self.s_y + self.s_p - float(ent(kz * k_y))
        full = self._kernel(self.t_all + self.t_p, c + self.n_p)
        self.s_all = float(ent(full))
        self.i_all = self.s_y + self.s_all - float(ent(full * k_y))
        del full, kz
        self.count = self.n_p
        if self.fast:
            self.tz = _packed(self.t_p, iu).contiguous()
            self.reduce = torch.stack([torch.ones_like(self.same), self.same], 1)  # all pairs, weighted by K_Y^2
        else:
            self.tz = self.t_p.clone()
        # tie-break: I(Y; channel j) alone, the same estimator
        saved = self.tz, self.count
        self.tz, self.count = torch.zeros_like(self.tz), 0
        h, hy = self.evaluate(c)
        self.tz, self.count = saved
        self.secondary = (self.s_y + h - hy).tolist()

    @staticmethod
    def _normalise(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = dist.shape[-1]
        iu = torch.triu_indices(n, n, offset=1, device=dist.device)
        pairs = _packed(dist, iu)
        med = pairs.median(dim=-1).values  # torch: the lower middle value for an even count
        med = torch.where(med > 0, med, pairs.mean(-1))  # mostly-duplicate channels: the mean
        scale = torch.where(med > 0, med, torch.ones_like(med))  # constant channel: distances stay 0
        return dist / scale[:, None, None], med

    def _kernel(self, t: torch.Tensor, count: int) -> torch.Tensor:
        return torch.exp(-t / count) if count else torch.ones_like(t)

    def widths(self) -> dict[str, Any]:
        return {"channels": self.medians.div(2).sqrt().tolist(), "labels": 0.0, "condition": self.sigma_cond}

    def evaluate(self, left: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, scale = self.n, -1.0 / (self.count + 1)
        if self.fast:
            # ||K||_F^2 = N + 2 sum_{i<k} K_ik^2 with K = exp(-(T_Z + D~_j) / (|Z| + 1)), over N^2
            chunk = max(1, _CHUNK_ELEMS // self.store.shape[1])
            out = []
            for a in range(0, left, chunk):
                buf = torch.add(self.store[a:min(a + chunk, left)], self.tz)
                buf.mul_(2.0 * scale).exp_()
                out.append(buf @ self.reduce)
            vals = torch.cat(out).mul_(2.0).add_(n).div_(n * n)
            vals = (-torch.log(vals)).cpu()
            return vals[:, 0], vals[:, 1]
        hs, hys = [], []
        chunk = max(1, _CHUNK_ELEMS // (n * n))
        for a in range(0, left, chunk):
            k = torch.exp((self.store[a:min(a + chunk, left)] + self.tz) * scale)
            hs.append(self.ent(k))
            hys.append(self.ent(k * self.k_y))
        return torch.cat(hs).cpu(), torch.cat(hys).cpu()

    def add(self, r: int) -> None:
        self.tz = self.tz + self.store[r]
        self.count += 1

    def swap(self, r: int, last: int) -> None:
        self.store[[r, last]] = self.store[[last, r]]

    def permutation_p(self, ch: int, cmi_true: float, permutations: int, gen: torch.Generator) -> float:
        dist = squared_distances(self.x[:, ch].to(self.dev).unsqueeze(0))
        dt_s = self._normalise(dist)[0][0]
        tz = _unpack(self.tz, self.iu, self.n, 0.0) if self.fast else self.tz
        rest = self.t_all + self.t_p - dt_s
        cz, call = self.count + 1, self.c + self.n_p
        return _permutation_p(dt_s, lambda dp: torch.exp(-(tz + dp) / cz), lambda dp: torch.exp(-(rest + dp) / call),
                              self.k_y, self.s_y, cmi_true, permutations, gen, self.ent)


def _permutation_p(x_s: torch.Tensor, make_z, make_f, k_y: torch.Tensor, s_y: float, cmi_true: float,
                   permutations: int, gen: torch.Generator, ent) -> float:
    """Fraction of row permutations of the added channel whose CMI is <= the true CMI.

    ``x_s``: the channel's (N, N) matrix (kernel or normalised distances); ``make_z(x_perm)`` and
    ``make_f(x_perm)`` build the kernels of P u S u {s'} and of P u (all channels but s) u {s'}
    for a batch of permuted copies. With the channel permuted,
    ``cmi = I(Y; rest u s') - I(Y; P u S u s')``.
    """
    n = x_s.shape[0]
    perms = torch.argsort(torch.rand(permutations, n, generator=gen), dim=1).to(x_s.device)
    chunk = max(1, _CHUNK_ELEMS // (4 * n * n))
    below = 0
    for a in range(0, permutations, chunk):
        pi = perms[a:a + chunk]
        xp = x_s[pi[:, :, None], pi[:, None, :]]
        z = make_z(xp)
        f = make_f(xp)
        i_z = s_y + ent(z) - ent(z * k_y)
        i_f = s_y + ent(f) - ent(f * k_y)
        below += int(((i_f - i_z) <= cmi_true + TIE_TOL).sum())
    return below / permutations
