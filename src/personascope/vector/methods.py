"""How a persona vector is computed from pooled activations: small factories returning `(pos, neg) -> vector`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from personascope.errors import PersonascopeError

Method = Callable[[Tensor, Tensor], Tensor]


def mean_diff() -> Method:
    """mean(pos) − mean(neg) per layer (Chen et al. 2025)."""

    def compute(pos: Tensor, neg: Tensor) -> Tensor:
        _check(pos, neg)
        return pos.float().mean(0) - neg.float().mean(0)

    return compute


def pca() -> Method:
    """The first principal component of the paired differences `pos[i] − neg[i]` per layer.

    Uncentred, as steering-vectors' `pca_aggregator` (equivalently: centred PCA of the differences and their
    negatives), so a consistent shift is the component found. Needs paired rows (`N == M`).
    """

    def compute(pos: Tensor, neg: Tensor) -> Tensor:
        _check(pos, neg)
        if pos.shape[0] != neg.shape[0]:
            raise PersonascopeError(
                f"the pca method needs paired rows, got {pos.shape[0]} positive and {neg.shape[0]} negative; "
                "use mean_diff or probe for unpaired data"
            )
        deltas = (pos.float() - neg.float()).transpose(0, 1)  # [L+1, N, d]
        _, _, vh = torch.linalg.svd(deltas, full_matrices=False)
        return _aligned(vh[:, 0], pos, neg)

    return compute


def probe(c: float = 0.01, max_iter: int = 2000) -> Method:
    """A logistic-regression probe per layer (scikit-learn, on standardised features).

    The weight vector is mapped back to activation space (divided by each feature's standard deviation), so
    projecting raw activations on it orders them as the probe does. Activations have more dimensions than
    there are responses, so the classes are always separable; the default strong regularisation keeps the probe
    from fitting noise (as `c` shrinks it tends to the mean difference scaled by each feature's variance).

    Args:
        c: inverse L2 regularisation strength (scikit-learn's `C`).
        max_iter: solver iterations.
    """

    def compute(pos: Tensor, neg: Tensor) -> Tensor:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        _check(pos, neg)
        labels = [1] * pos.shape[0] + [0] * neg.shape[0]
        features = torch.cat([pos, neg]).float().numpy()
        directions = torch.zeros(pos.shape[1], pos.shape[2])
        for layer in range(pos.shape[1]):
            scaler = StandardScaler().fit(features[:, layer])
            fit = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(features[:, layer]), labels)
            directions[layer] = torch.from_numpy(fit.coef_[0] / scaler.scale_).float()
        return _aligned(directions, pos, neg)

    return compute


METHODS: dict[str, Callable[[], Method]] = {"mean_diff": mean_diff, "pca": pca, "probe": probe}


def get_method(name: str) -> Method:
    """The method called `name` with its default settings."""
    try:
        return METHODS[name]()
    except KeyError:
        raise PersonascopeError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None


def _check(pos: Tensor, neg: Tensor) -> None:
    if pos.dim() != 3 or neg.dim() != 3 or pos.shape[1:] != neg.shape[1:]:
        raise PersonascopeError(
            f"activations must be [N, L+1, d] with matching layers and width, got {tuple(pos.shape)} and "
            f"{tuple(neg.shape)}"
        )
    if pos.shape[0] < 2 or neg.shape[0] < 2:
        raise PersonascopeError(
            f"a persona vector needs at least 2 positive and 2 negative responses, got {pos.shape[0]} and "
            f"{neg.shape[0]}; generate more samples"
        )


def _aligned(directions: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """Point each layer's direction the way of mean(pos) − mean(neg) and give it the length of the mean
    difference's component along it."""
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    along = (unit * mean_diff()(pos, neg)).sum(-1, keepdim=True)
    return unit * along  # a negative component flips the direction
