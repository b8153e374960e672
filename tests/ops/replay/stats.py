"""Chi-square bounds for the replay family's statistical tests: fixed seeds, so each test is
deterministic; the bound is the upper 0.1% quantile (Wilson-Hilferty), so a correct sampler fails
one seed in a thousand and a biased one fails by a wide margin."""

from __future__ import annotations

import math

import torch

Z_999 = 3.0902  # the standard normal's 0.999 quantile


def chi2_bound(dof: int) -> float:
    """The 0.999 quantile of chi-square with ``dof`` degrees of freedom (Wilson-Hilferty)."""
    k = float(dof)
    return k * (1 - 2 / (9 * k) + Z_999 * math.sqrt(2 / (9 * k))) ** 3


def chi2(observed: torch.Tensor, expected: torch.Tensor) -> float:
    o, e = observed.to(torch.float64), expected.to(torch.float64)
    return float(((o - e) ** 2 / e).sum())


def assert_fits(observed: torch.Tensor, expected: torch.Tensor, what: str, *, dof: int | None = None) -> None:
    """Counts against expected counts (each expected count >= 5, or the test is void)."""
    assert float(expected.min()) >= 5, "expected counts too small for a chi-square test"
    stat, bound = chi2(observed, expected), chi2_bound(dof if dof is not None else observed.numel() - 1)
    assert stat < bound, f"{what}: chi-square {stat:.1f} >= the 0.1% bound {bound:.1f}"
