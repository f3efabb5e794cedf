"""Information theory on Gram matrices: matrix-based Renyi entropy, MI and CMI (pure tensor math)."""

from toolchain.info.renyi import (
    conditional_mutual_information,
    eigvalsh,
    entropy_from_eigenvalues,
    gaussian_gram,
    gram_from_sq_distances,
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
