"""Keep counts under a latency budget: a multiple-choice knapsack over each layer's candidate counts.

A FLOPs budget is linear in the kept fractions and a greedy walk meets it (``toolchain.allocation``).
Latency is not: a conv's entry in the table (``toolchain.latency``) depends on both its own kept
count and its producer's, and it steps where kernels change. So, as in HALP (NVIDIA, NeurIPS 2022):

1. every prunable layer (channel group) may keep one of its candidate counts (the table's grid,
   restricted to what its measured sensitivity covers, ``toolchain.allocation.sensitivity_curve``),
   valued by that sensitivity (the KL damage of cutting it alone; layers are assumed to add up);
2. each choice costs the table latency of the convs whose outputs the layer sets, read at the
   current widths of their inputs (and the convs that only read it, at their fixed outputs);
3. the choice for all layers together is the exact optimum of that multiple-choice knapsack
   (``solve_mckp``, dynamic programming over latency in small units, costs rounded up so that
   what it returns fits), and steps 2-3 repeat with the new widths until they settle; the best
   solution that fits the budget under the full table prediction is kept;
4. a last pass trades exact table deltas: it cuts where the cut costs least damage per
   millisecond while over the budget, then gives channels back where they buy the most damage per
   millisecond while the budget still holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from toolchain.errors import UserError
from toolchain.latency import LatencyTable, LatencyTerm, candidate_counts
from toolchain.ranking.base import PrunableLayer


def solve_mckp(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], capacity: float, *,
               resolution: int = 4000) -> list[int] | None:
    """One option per group minimising the summed value with summed cost <= `capacity`; None when nothing fits.

    Costs are counted in units of ``capacity / resolution``, rounded up, so the answer always fits the real
    costs, and it is optimal among answers whose rounded costs fit (exact when the costs are whole units:
    integer costs with ``resolution = capacity``). Costs must be >= 0."""
    if capacity < 0:
        return None
    unit = capacity / resolution if capacity > 0 else 1.0
    big = resolution + 1
    inf = math.inf
    dp = np.full(resolution + 1, inf)
    dp[0] = 0.0
    choices: list[np.ndarray] = []
    for vals, cs in zip(values, costs):
        if len(vals) != len(cs) or not len(vals):
            raise ValueError("solve_mckp: each group needs one cost per value, and at least one option")
        new = np.full(resolution + 1, inf)
        pick = np.full(resolution + 1, -1, dtype=np.int64)
        for j, (v, c) in enumerate(zip(vals, cs)):
            if c < 0 or not math.isfinite(v):
                if c < 0:
                    raise ValueError("solve_mckp: costs must be >= 0")
                continue
            w = int(math.ceil(c / unit - 1e-9)) if c > 0 else 0
            if w >= big:
                continue
            shifted = np.full(resolution + 1, inf)
            shifted[w:] = dp[:resolution + 1 - w] + v
            better = shifted < new
            new[better], pick[better] = shifted[better], j
        dp = new
        choices.append(pick)
        if not np.isfinite(dp).any():
            return None
    b = int(np.argmin(dp))
    if not math.isfinite(dp[b]):
        return None
    out = [0] * len(choices)
    for i in range(len(choices) - 1, -1, -1):
        j = int(choices[i][b])
        out[i] = j
        c = costs[i][j]
        b -= int(math.ceil(c / unit - 1e-9)) if c > 0 else 0
    return out


def _option_costs(layer: str, options: Sequence[int], terms: Sequence[LatencyTerm], table: LatencyTable,
                  current: dict[str, int]) -> list[float]:
    """Latency of the convs a choice of `layer` sets: the ones it outputs (inputs at `current`) and the ones
    that read it but output no prunable layer."""
    own = [t for t in terms if t.out == layer or (t.out is None and t.inp == layer)]
    return [sum(table.ms(t.spec({**current, layer: k})) for t in own) for k in options]


def _minplus(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``z[b] = min_a x[a] + y[b - a]`` and the minimising ``a``: two budgets spent together."""
    n = len(x)
    a = np.arange(n)
    d = a[None, :] - a[:, None]  # rows a, columns b
    vals = x[:, None] + np.where(d >= 0, y[np.clip(d, 0, None)], math.inf)
    return vals.min(0), vals.argmin(0)


def _shift(x: np.ndarray, w: int) -> np.ndarray:
    out = np.full_like(x, math.inf)
    if w < len(x):
        out[w:] = x[:len(x) - w]
    return out


def forest_edges(names: Sequence[str], terms: Sequence[LatencyTerm]) -> dict[tuple[str, str], list[LatencyTerm]] | None:
    """The terms that tie two layers, by (unordered) pair, when those pairs form a forest (chains such as VGG,
    inverted residuals); None when they close a cycle (the shortcut of a ResNet's downsampling block)."""
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    edges: dict[tuple[str, str], list[LatencyTerm]] = {}
    for t in terms:
        if t.out and t.inp and t.out != t.inp:
            pair = tuple(sorted((t.out, t.inp)))
            if pair not in edges:
                a, b = find(pair[0]), find(pair[1])
                if a == b:
                    return None
                parent[a] = b
            edges.setdefault(pair, []).append(t)
    return edges


def solve_forest(names: Sequence[str], options: dict[str, list[int]], damage: dict[str, np.ndarray],
                 unary: dict[str, list[float]], edges: dict[tuple[str, str], list[LatencyTerm]], table: LatencyTable,
                 capacity: float, resolution: int = 1000) -> dict[str, int] | None:
    """The exact optimum (costs rounded up to ``capacity / resolution``) of the choice of one count per layer under
    a latency capacity when the layers' couplings form a forest: dynamic programming over each tree, leaves
    first, over (count, latency units); trees are then combined by min-plus convolution."""
    if capacity <= 0:
        return None
    unit, size = capacity / resolution, resolution + 1

    def units(ms: float) -> int:
        return int(math.ceil(ms / unit - 1e-9)) if ms > 0 else 0

    adj: dict[str, list[str]] = {n: [] for n in names}
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    tables: dict[str, np.ndarray] = {}  # node -> (its options, size): least damage of its subtree
    links: dict[str, tuple[str, np.ndarray, np.ndarray, np.ndarray]] = {}  # child -> (parent, argk, split, w)

    def solve(v: str, parent: str | None) -> None:
        f = np.full((len(options[v]), size), math.inf)
        for i, k in enumerate(options[v]):
            w = units(unary[v][i])
            if w < size:
                f[i, w] = damage[v][k]
        for c in adj[v]:
            if c == parent:
                continue
            solve(c, v)
            pair_terms = edges[tuple(sorted((v, c)))]
            w_e = np.array([[units(sum(table.ms(t.spec({v: kv, c: kc})) for t in pair_terms))
                             for kc in options[c]] for kv in options[v]])
            argk = np.zeros((len(options[v]), size), dtype=np.int64)
            split = np.zeros((len(options[v]), size), dtype=np.int64)
            for i in range(len(options[v])):
                shifted = np.stack([_shift(tables[c][j], int(w_e[i, j])) for j in range(len(options[c]))])
                g, argk[i] = shifted.min(0), shifted.argmin(0)
                f[i], split[i] = _minplus(f[i], g)
            links[c] = (v, argk, split, w_e)
        tables[v] = f

    roots, seen = [], set()
    for n in names:
        if n not in seen:
            stack = [n]
            while stack:
                m = stack.pop()
                if m not in seen:
                    seen.add(m)
                    stack += adj[m]
            roots.append(n)
            solve(n, None)
    total, parts = np.zeros(size), []
    for r in roots:  # trees spend the capacity together
        best_k = tables[r].argmin(0)
        total, split = _minplus(total, tables[r].min(0))
        parts.append((r, best_k, split))
    b = int(np.argmin(total))
    if not math.isfinite(total[b]):
        return None
    choice: dict[str, int] = {}

    def back(v: str, i: int, b: int) -> None:
        choice[v] = options[v][i]
        children = [c for c in adj[v] if c in links and links[c][0] == v and c not in choice]
        for c in reversed(children):
            _, argk, split, w_e = links[c]
            a = int(split[i, b])
            j = int(argk[i, b - a])
            back(c, j, b - a - int(w_e[i, j]))
            b = a

    for r, best_k, split in reversed(parts):
        a = int(split[b])
        back(r, int(best_k[b - a]), b - a)
        b = a
    return choice


def allocate_latency(layers: Sequence[PrunableLayer], sensitivity: dict[str, list[list[float]]],
                     table: LatencyTable, terms: Sequence[LatencyTerm], budget_ms: float, *, round_to: int = 1,
                     levels: int = 16, min_keep: int | None = None, iterations: int = 8
                     ) -> tuple[dict[str, int], dict[str, Any]]:
    """Keep counts whose predicted latency (``table.predict``) is at most `budget_ms` (module docstring)."""
    from toolchain.allocation import sensitivity_curve

    names = [layer.name for layer in layers]
    curves = {layer.name: sensitivity_curve(sensitivity[layer.name], layer.channels) for layer in layers}
    step = max(1, int(round_to))
    floor = min_keep if min_keep is not None else step
    options = {layer.name: [k for k in candidate_counts(layer.channels, levels, step, floor)
                            if math.isfinite(curves[layer.name][k])] for layer in layers}
    dense = {layer.name: layer.channels for layer in layers}
    smallest = {n: options[n][0] for n in names}
    if table.predict(terms, smallest) > budget_ms:
        raise UserError(f"latency budget {budget_ms:.3f} ms cannot be met: the smallest widths the sensitivity "
                        f"covers predict {table.predict(terms, smallest):.3f} ms ({table.kind})")
    fixed = [t for t in terms if t.out is None and t.inp is None]
    const = table.overhead_ms + sum(table.ms(t.dense) for t in fixed)

    def damage(counts: dict[str, int]) -> float:
        return float(sum(curves[n][counts[n]] for n in names))

    edges = forest_edges(names, terms)
    if edges is not None:
        unary = {n: [sum(table.ms(t.spec({n: k})) for t in terms if (t.out == n and not t.inp)
                         or (t.inp == n and not t.out)) for k in options[n]] for n in names}
        best = solve_forest(names, options, curves, unary, edges, table, budget_ms - const) or smallest
        solver = "forest-dp"
    else:
        best, solver = _iterate(names, options, curves, table, terms, budget_ms - const, smallest, dense,
                                iterations, lambda c: table.predict(terms, c) <= budget_ms, damage), "iterated-mckp"
    counts, moves = _trade(best, options, curves, table, terms, budget_ms)
    predicted = table.predict(terms, counts)
    return counts, {"budget_ms": budget_ms, "predicted_ms": predicted, "dense_ms": table.predict(terms, dense),
                    "table": table.kind, "predicted_damage": damage(counts), "round_to": step, "levels": levels,
                    "solver": solver, "trades": moves}


def _iterate(names, options, curves, table, terms, capacity, smallest, dense, iterations, fits, damage):
    """Couplings with a cycle: knapsacks with each conv's input widths held at the last answer's, repeated until the
    answer repeats; the best answer that fits under the full prediction."""
    best, current, seen = smallest, dense, []
    for _ in range(iterations):
        costs = [_option_costs(n, options[n], terms, table, current) for n in names]
        values = [[float(curves[n][k]) for k in options[n]] for n in names]
        pick = solve_mckp(values, costs, capacity)
        if pick is None:
            break
        current = {n: options[n][j] for n, j in zip(names, pick)}
        if fits(current) and damage(current) < damage(best):
            best = current
        if current in seen:
            break
        seen.append(current)
    return best


def _trade(counts: dict[str, int], options: dict[str, list[int]], curves: dict[str, np.ndarray],
           table: LatencyTable, terms: Sequence[LatencyTerm], budget_ms: float) -> tuple[dict[str, int], int]:
    """Step 4 of the module docstring, on exact table predictions."""
    counts, moves = dict(counts), 0
    now = table.predict(terms, counts)
    while True:  # over the budget (after the knapsack this does not happen; kept for safety): cut
        if now <= budget_ms:
            break
        best = None
        for n, opts in options.items():
            i = opts.index(counts[n])
            if i == 0:
                continue
            trial = {**counts, n: opts[i - 1]}
            saved = now - table.predict(terms, trial)
            if saved <= 0:
                continue
            key = ((curves[n][opts[i - 1]] - curves[n][counts[n]]) / saved, n)
            if best is None or key < best[0]:
                best = (key, trial)
        if best is None:
            break
        counts, moves = best[1], moves + 1
        now = table.predict(terms, counts)
    while True:  # slack left: give back what buys the most
        best = None
        for n, opts in options.items():
            i = opts.index(counts[n])
            if i + 1 >= len(opts):
                continue
            trial = {**counts, n: opts[i + 1]}
            after = table.predict(terms, trial)
            if after > budget_ms:
                continue
            gain = curves[n][counts[n]] - curves[n][opts[i + 1]]
            key = (-gain / max(after - now, 1e-9), n)
            if best is None or key < best[0]:
                best = (key, trial, after)
        if best is None:
            break
        counts, now, moves = best[1], best[2], moves + 1
    return counts, moves
