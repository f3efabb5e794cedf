"""Matrix-based Renyi entropy, MI and CMI against closed forms and identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from toolchain.info import (
    conditional_mutual_information,
    entropy_from_eigenvalues,
    gaussian_gram,
    is_saturated,
    joint_entropy,
    joint_gram,
    label_gram,
    median_sigma,
    mutual_information,
    normalize_gram,
    paper_sigma,
    renyi_entropy,
    squared_distances,
)

ALPHAS = [0.5, 1.0, 1.01, 2.0, 3.0]


def _grams(n=12, count=3, seed=0, d=5, sigma=1.5):
    g = torch.Generator().manual_seed(seed)
    return [gaussian_gram(torch.randn(n, d, generator=g, dtype=torch.float64), sigma) for _ in range(count)]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_identity_has_max_entropy(alpha):
    n = 16
    s = renyi_entropy(torch.eye(n, dtype=torch.float64) / n, alpha)
    assert abs(float(s) - math.log(n)) < 1e-10


@pytest.mark.parametrize("alpha", ALPHAS)
def test_all_ones_has_zero_entropy(alpha):
    n = 16
    s = renyi_entropy(torch.ones(n, n, dtype=torch.float64) / n, alpha)
    assert abs(float(s)) < 1e-10


def test_alpha_to_one_is_von_neumann():
    a = _grams(count=1)[0]
    lam = np.clip(np.linalg.eigvalsh(a.numpy()), 0, None)
    vn = -float(np.sum(lam[lam > 0] * np.log(lam[lam > 0])))
    assert abs(float(renyi_entropy(a, 1.0)) - vn) < 1e-10
    assert abs(float(renyi_entropy(a, 1.0 + 1e-7)) - vn) < 1e-5


def test_alpha2_frobenius_equals_eigenvalue_path():
    grams = torch.stack(_grams(count=4, seed=3))
    fro = renyi_entropy(grams, 2.0)
    lam = torch.from_numpy(np.linalg.eigvalsh(grams.numpy()))
    eig = entropy_from_eigenvalues(lam, 2.0)
    assert torch.allclose(fro, eig, atol=1e-10)
    # and the slightly-off alpha goes through eigenvalues and is close
    assert torch.allclose(renyi_entropy(grams, 2.0 + 1e-9), fro, atol=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_entropy_bounds_and_batching(alpha):
    grams = torch.stack(_grams(count=5, seed=1))
    s = renyi_entropy(grams, alpha)
    assert s.shape == (5,)
    assert bool((s >= -1e-12).all()) and bool((s <= math.log(12) + 1e-12).all())
    one_by_one = torch.stack([renyi_entropy(g, alpha) for g in grams])
    assert torch.allclose(s, one_by_one, atol=1e-12)


def test_entropy_normalises_its_input():
    a = _grams(count=1)[0]
    assert abs(float(renyi_entropy(a * 7.0, 1.01)) - float(renyi_entropy(a, 1.01))) < 1e-12


def test_gram_is_unit_trace_and_matches_definition():
    x = torch.randn(10, 4, dtype=torch.float64)
    a = gaussian_gram(x, 2.0)
    assert abs(float(a.trace()) - 1.0) < 1e-12
    k = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1).numpy() / (2 * 2.0**2)) / 10
    assert np.allclose(a.numpy(), k, atol=1e-14)
    assert torch.allclose(normalize_gram(a * 3), a)


def test_squared_distances_batched():
    x = torch.randn(3, 9, 6)
    d = squared_distances(x)
    ref = ((x[:, :, None].double() - x[:, None].double()) ** 2).sum(-1)
    assert d.shape == (3, 9, 9) and torch.allclose(d, ref, atol=1e-10)
    assert float(d.diagonal(dim1=-2, dim2=-1).abs().max()) == 0.0


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mi_with_itself_is_entropy(alpha):
    # I(X;X) = S(X) + S(X) - S(X,X) = S(X) holds when the joint Gram N (A o A) is A itself:
    # kernels with entries in {0, 1} (a class-indicator Gram, or the Gaussian limit sigma -> 0).
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3, 3, 2, 1])
    block = (labels[:, None] == labels[None]).double() / len(labels)
    s = float(renyi_entropy(block, alpha))
    assert s > 0.5
    assert abs(float(mutual_information(block, block, alpha)) - s) < 1e-10
    # same for distinct points with a tiny width (Gram -> I/N, S = ln N)
    x = torch.arange(12, dtype=torch.float64)[:, None]
    a = gaussian_gram(x, 0.05)
    assert abs(float(mutual_information(a, a, alpha)) - math.log(12)) < 1e-10
    # for a smooth Gaussian Gram S(X,X) > S(X), so I(X;X) < S(X): check the definition literally
    a = _grams(count=1, seed=4)[0]
    expected = 2 * renyi_entropy(a, alpha) - renyi_entropy(joint_gram(a, a), alpha)
    assert abs(float(mutual_information(a, a, alpha)) - float(expected)) < 1e-12
    assert float(mutual_information(a, a, alpha)) <= float(renyi_entropy(a, alpha)) + 1e-12


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mi_symmetric(alpha):
    a, b = _grams(count=2, seed=5)
    assert abs(float(mutual_information(a, b, alpha)) - float(mutual_information(b, a, alpha))) < 1e-10


@pytest.mark.parametrize("alpha", [1.01, 2.0])
def test_joint_entropy_order_invariant_and_sets(alpha):
    a, b, c = _grams(count=3, seed=6)
    s1 = float(joint_entropy(a, b, c, alpha=alpha))
    s2 = float(joint_entropy(c, a, b, alpha=alpha))
    s3 = float(renyi_entropy(joint_gram(b, joint_gram(c, a)), alpha))
    assert abs(s1 - s2) < 1e-10 and abs(s1 - s3) < 1e-10
    # N^2 (A o B o C) is the unit-trace joint for Gaussian Grams
    n = a.shape[0]
    assert torch.allclose(joint_gram(a, b, c), n * n * a * b * c, atol=1e-14)
    # joint entropy is at least the largest marginal (Hadamard products of normalised Grams)
    assert s1 >= max(float(renyi_entropy(g, alpha)) for g in (a, b, c)) - 1e-12


@pytest.mark.parametrize("alpha", [0.7, 1.01, 2.0])
def test_cmi_chain_rule(alpha):
    y, r, z1, z2 = _grams(count=4, seed=7)
    cmi = conditional_mutual_information(y, r, [z1, z2], alpha)
    chain = mutual_information(y, [r, z1, z2], alpha) - mutual_information(y, [z1, z2], alpha)
    assert abs(float(cmi) - float(chain)) < 1e-10
    # with an empty conditioning set it is plain MI
    assert abs(float(conditional_mutual_information(y, r, None, alpha))
               - float(mutual_information(y, r, alpha))) < 1e-12


def test_informative_variable_has_more_mi_than_noise():
    g = torch.Generator().manual_seed(0)
    n = 60
    labels = torch.arange(n) % 3
    y = label_gram(labels, 3, 1.0)
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    informative = gaussian_gram(onehot + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64), 1.0)
    noise = gaussian_gram(0.6 * torch.randn(n, 3, generator=g, dtype=torch.float64), 1.0)
    # similar entropies, very different information about the labels
    assert float(mutual_information(y, informative, 2.0)) > 5 * float(mutual_information(y, noise, 2.0))
    # and conditioning on the informative variable removes most of what the noise "knows"
    assert float(conditional_mutual_information(y, informative, noise, 2.0)) > \
        5 * float(conditional_mutual_information(y, noise, informative, 2.0))


def test_label_gram_values():
    labels = torch.tensor([0, 1, 1])
    k = label_gram(labels, 3, 2.0, normalize=False)
    assert float(k[1, 2]) == pytest.approx(1.0)
    assert float(k[0, 1]) == pytest.approx(math.exp(-2 / (2 * 4.0)))


def test_paper_sigma_and_saturation_and_median():
    assert paper_sigma(256, 1024) == pytest.approx(5 * 256 ** (-1 / 1028))
    assert paper_sigma(256, 10) == pytest.approx(5 * 256 ** (-1 / 14))
    with pytest.raises(ValueError):
        paper_sigma(0, 3)
    assert is_saturated(0.995 * math.log(100), 100) and not is_saturated(0.9 * math.log(100), 100)
    d2 = torch.tensor([[0.0, 2.0, 8.0], [2.0, 0.0, 18.0], [8.0, 18.0, 0.0]])
    assert float(median_sigma(d2)) == pytest.approx(2.0)


def test_bad_alpha_rejected():
    a = _grams(count=1)[0]
    for alpha in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            renyi_entropy(a, alpha)


def test_eigvalsh_batched_matches_torch_and_restores_blas_threads():
    from threadpoolctl import threadpool_info

    from toolchain.info import eigvalsh

    before = [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
    a = torch.randn(2, 5, 20, 20, dtype=torch.float64)
    a = a @ a.transpose(-1, -2)
    lam = eigvalsh(a)
    assert lam.shape == (2, 5, 20) and lam.dtype == torch.float64
    assert torch.allclose(lam, torch.linalg.eigvalsh(a), atol=1e-9)
    assert [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"] == before
