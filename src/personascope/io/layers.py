"""Layer choices as users write them: `12`, `8,10,12`, `6-14` (inclusive), mixes of these, or `all`."""

from __future__ import annotations

from collections.abc import Sequence

from personascope.errors import InputError

_FORMAT = "give a layer, layers like 8,10,12, a range like 6-14, or 'all'"


def parse_layers(choice: str | int | Sequence[int], num_layers: int | None = None, *, option: str = "layers"
                 ) -> list[int]:
    """The sorted, distinct layers of `choice`; `all` needs `num_layers`. `option` names the choice in errors."""
    if isinstance(choice, int):
        return [choice]
    if not isinstance(choice, str):
        layers = sorted(set(choice))
    elif choice.strip().lower() == "all":
        if num_layers is None:
            raise InputError(f"{option} 'all' is not available here: list the layers, e.g. 8,10,12 or 6-14")
        layers = list(range(1, num_layers))
    else:
        layers = []
        try:
            for part in (p.strip() for p in choice.split(",") if p.strip()):
                low, _, high = part.partition("-")
                layers += list(range(int(low), int(high) + 1)) if high else [int(low)]
        except ValueError:
            raise InputError(f"{option} {choice!r}: {_FORMAT}") from None
        layers = sorted(set(layers))
    if not layers:
        raise InputError(f"no {option} given: {_FORMAT}")
    return layers


def check_layer(layer: int, num_layers: int, *, low: int = 0, high: int | None = None, owner: str = "this model"
                ) -> int:
    """`layer` if `low <= layer <= high` (default 0..num_layers), else one error naming the valid range."""
    high = num_layers if high is None else high
    if isinstance(layer, bool) or not isinstance(layer, int) or not low <= layer <= high:
        hint = "" if (low, high) == (0, num_layers) else " here"
        raise InputError(
            f"layer {layer} is out of range: {owner} has layers 0..{num_layers}, use {low}..{high}{hint} "
            "(0 = embeddings, l = output of decoder layer l-1)"
        )
    return layer
