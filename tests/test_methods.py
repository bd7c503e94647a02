"""Vector methods on synthetic activations with a planted direction."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import cosine_similarity

from personascope.errors import PersonascopeError
from personascope.vector.methods import METHODS, get_method

N, LAYERS, D = 48, 3, 24


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs that share a large random base; the positive one is shifted along a planted unit direction."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(LAYERS, D, generator=gen)
    direction /= direction.norm(dim=-1, keepdim=True)
    base = torch.randn(N, LAYERS, D, generator=gen)
    shift = 2 + 0.5 * torch.randn(N, 1, 1, generator=gen)
    pos = base + shift * direction + 0.1 * torch.randn(N, LAYERS, D, generator=gen)
    neg = base + 0.1 * torch.randn(N, LAYERS, D, generator=gen)
    return pos, neg, direction


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_recovers_the_planted_direction_with_its_sign(name):
    pos, neg, direction = planted()
    vector = get_method(name)(pos, neg)
    assert vector.shape == (LAYERS, D)
    assert (cosine_similarity(vector, direction, dim=-1) > 0.95).all()
    flipped = get_method(name)(neg, pos)
    assert (cosine_similarity(flipped, -direction, dim=-1) > 0.95).all()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_length_is_the_mean_difference_component(name):
    pos, neg, _ = planted(1)
    vector = get_method(name)(pos, neg)
    mean_diff = pos.mean(0) - neg.mean(0)
    torch.testing.assert_close((vector * mean_diff).sum(-1), vector.norm(dim=-1) ** 2, rtol=1e-4, atol=1e-4)


def test_mean_diff_is_the_difference_of_means():
    pos, neg, _ = planted(2)
    torch.testing.assert_close(get_method("mean_diff")(pos, neg), pos.mean(0) - neg.mean(0))


def test_probe_separates_where_the_mean_difference_is_misled():
    # Classes differ along both e0 and e1, but e1 carries large noise: only e0 separates them cleanly.
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 40, 1, 2, generator=gen) * torch.tensor([0.1, 3.0])
    pos = torch.tensor([1.0, 1.0]) + noise[0]
    neg = torch.tensor([-1.0, -1.0]) + noise[1]
    probe, mean = get_method("probe")(pos, neg)[0], get_method("mean_diff")(pos, neg)[0]
    assert float(probe[0]) > 0 and abs(float(probe[1])) < 0.3 * float(probe[0])
    by_probe = (pos[:, 0] @ probe, neg[:, 0] @ probe)
    assert float(by_probe[0].min()) > float(by_probe[1].max())
    by_mean = (pos[:, 0] @ mean, neg[:, 0] @ mean)
    assert float(by_mean[0].min()) < float(by_mean[1].max())


def test_bad_inputs_give_clear_errors():
    pos, neg, _ = planted()
    with pytest.raises(PersonascopeError, match="mean_diff, pca, probe"):
        get_method("lda")
    with pytest.raises(PersonascopeError, match="paired"):
        get_method("pca")(pos, neg[:10])
    with pytest.raises(PersonascopeError, match="at least 2"):
        get_method("mean_diff")(pos[:1], neg)
    with pytest.raises(PersonascopeError, match="matching"):
        get_method("probe")(pos, neg[:, :2])
