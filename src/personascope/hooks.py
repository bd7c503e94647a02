"""The one mechanism for touching the residual stream: capture and interventions at chosen layers.

Layer `l` follows HF `hidden_states`: 0 is the input of `layers[0]` (the embedding output), `l >= 1` is the
output of `layers[l-1]`. Capture at the last layer `L` reads after the final norm, as HF's `hidden_states[L]`
does; interventions at `L` act before it.

Every hook on a model goes through one `HookManager` per model: a pre-hook on the decoder stack works out, for
each forward call, which tokens are padding and where each token sits in its row (from the 2-D attention mask,
so it stays right under left padding and KV-cached `generate()`), and per-layer hooks run an ordered list of
*operations* — plain callables `op(hidden[B, T, H], tokens: TokenContext) -> Tensor | None` that return a new
hidden state (interventions) or None (observers). `steer`, `capture`, monitoring and the fine-tuning guard are
all operations on this manager, so they compose, and leaving a context removes exactly what it added.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from personascope.errors import PersonascopeError
from personascope.models import ModelHandle, as_module, backbone, decoder_layers, final_norm, hidden_size

if TYPE_CHECKING:
    from personascope.vector import PersonaVector

Scope = Literal["prompt", "response", "all"]
Pool = Literal["response_avg", "prompt_avg", "prompt_last"]
SCOPES: tuple[str, ...] = ("prompt", "response", "all")
POOLS: tuple[str, ...] = ("response_avg", "prompt_avg", "prompt_last")


@dataclass
class TokenContext:
    """Where the tokens of the current forward call sit.

    Attributes:
        valid: `[B, T]` bool, False at padding.
        positions: `[B, T]` index of each token among its row's real tokens (0 = first prompt token).
        prompt_lengths: `[B]` number of prompt tokens per row (system + user + assistant header).

    Masks are made once per forward call and shared by the operations of every layer.
    """

    valid: Tensor
    positions: Tensor
    prompt_lengths: Tensor
    _masks: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def scope_mask(self, scope: str) -> Tensor:
        """`prompt`: the chat prompt; `response`: positions whose outputs produce response tokens (the last
        prompt position and every response position); `all`: every real token."""
        key = f"scope:{scope}"
        if key not in self._masks:
            lengths = self.prompt_lengths[:, None]
            if scope == "prompt":
                self._masks[key] = self.valid & (self.positions < lengths)
            elif scope == "response":
                self._masks[key] = self.valid & (self.positions >= lengths - 1)
            elif scope == "all":
                self._masks[key] = self.valid
            else:
                raise PersonascopeError(f"unknown token scope {scope!r}: use one of {', '.join(SCOPES)}")
        return self._masks[key]

    def pool_mask(self, pool: str) -> Tensor:
        """`response_avg`: the response tokens; `prompt_avg`: the prompt tokens; `prompt_last`: the last one."""
        key = f"pool:{pool}"
        if key not in self._masks:
            lengths = self.prompt_lengths[:, None]
            if pool == "response_avg":
                self._masks[key] = self.valid & (self.positions >= lengths)
            elif pool == "prompt_avg":
                self._masks[key] = self.valid & (self.positions < lengths)
            elif pool == "prompt_last":
                self._masks[key] = self.valid & (self.positions == lengths - 1)
            else:
                raise PersonascopeError(f"unknown pooling {pool!r}: use one of {', '.join(POOLS)}")
        return self._masks[key]


Operation = Callable[[Tensor, TokenContext], "Tensor | None"]


class StopForward(Exception):
    """Raised by a hook once the deepest layer anyone needs has run; `run_forward` catches it."""


class HookManager:
    """The hooks of one model. Get it with `HookManager.of(model)`; add operations with `add`."""

    _managers: weakref.WeakKeyDictionary[nn.Module, HookManager] = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module) -> None:
        # Dynamo skips guards on module hooks by default, so a model compiled before an operation was added
        # would go on running its old graph without it; guarding makes a change of hooks recompile instead.
        # (transformers has imported torch._dynamo by the time a model exists, so this costs nothing.)
        import torch._dynamo

        torch._dynamo.config.skip_nnmodule_hook_guards = False
        self.model = model
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self._norm = final_norm(model)
        self._stack = backbone(model)
        self._ops: dict[tuple[int, str], list[tuple[int, Operation]]] = {}
        self._handles: dict[tuple[int, str], torch.utils.hooks.RemovableHandle] = {}
        self._root_handle: torch.utils.hooks.RemovableHandle | None = None
        self._explicit_lengths: list[Tensor] = []
        self._prefill_lengths: Tensor | None = None
        self._next_id = 0
        self._stop_keys: set[int] = set()
        self.tokens: TokenContext | None = None

    @classmethod
    def of(cls, model: ModelHandle | nn.Module) -> HookManager:
        module = as_module(model)
        manager = cls._managers.get(module)
        if manager is None:
            manager = cls._managers[module] = cls(module)
        return manager

    # -- registration -----------------------------------------------------------------------------------

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer <= self.num_layers:
            raise PersonascopeError(
                f"layer {layer} is out of range: this model has layers 0..{self.num_layers} "
                "(0 = embeddings, l = output of decoder layer l-1)"
            )
        return layer

    def add(self, layer: int, op: Operation, *, site: Literal["residual", "read"] = "residual") -> int:
        """Run `op` on the hidden state at `layer`; returns a key for `remove`.

        `site="read"` reads layer `L` after the final norm (HF `hidden_states[L]`); elsewhere it is the same
        as `residual`. Operations at one site run in the order they were added.
        """
        self.check_layer(layer)
        if site == "read" and layer == self.num_layers and self._norm is not None:
            slot = (layer, "norm")
        else:
            slot = (layer, "residual")
        key = self._next_id
        self._next_id += 1
        self._ops.setdefault(slot, []).append((key, op))
        if slot not in self._handles:
            self._handles[slot] = self._register(slot)
        if self._root_handle is None:
            self._root_handle = self._stack.register_forward_pre_hook(self._on_stack_call, with_kwargs=True)
        return key

    @property
    def active(self) -> bool:
        """Whether any operation (steering, capture, ...) is installed on the model now."""
        return any(self._ops.values())

    def remove(self, key: int) -> None:
        self._stop_keys.discard(key)
        for slot, ops in list(self._ops.items()):
            ops[:] = [(k, op) for k, op in ops if k != key]
            if not ops:
                del self._ops[slot]
                self._handles.pop(slot).remove()
        if not self._ops and self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
            self._prefill_lengths = None
            self.tokens = None

    def push_prompt_lengths(self, lengths: Sequence[int] | Tensor) -> None:
        """Fix the prompt length of each row (for teacher-forced passes over prompt + response)."""
        device = next(self.model.parameters()).device
        self._explicit_lengths.append(torch.as_tensor(lengths, dtype=torch.long, device=device))

    def pop_prompt_lengths(self) -> None:
        self._explicit_lengths.pop()

    def add_stop(self) -> int:
        """End forward passes after the deepest hooked layer (until `remove(key)`): no deeper layer, no logits."""
        key = self._next_id
        self._next_id += 1
        self._stop_keys.add(key)
        return key

    def _is_last_slot(self, slot: tuple[int, str]) -> bool:
        deepest = max(layer for layer, _ in self._ops)
        if slot[0] != deepest:
            return False
        return slot[1] == "norm" or (deepest, "norm") not in self._ops

    # -- hooks ------------------------------------------------------------------------------------------

    def _register(self, slot: tuple[int, str]) -> torch.utils.hooks.RemovableHandle:
        layer, where = slot
        if where == "norm":
            return self._norm.register_forward_hook(self._output_hook(slot), prepend=True)
        if layer == 0:
            return self.layers[0].register_forward_pre_hook(self._input_hook(slot), with_kwargs=True)
        return self.layers[layer - 1].register_forward_hook(self._output_hook(slot), prepend=True)

    def _run(self, slot: tuple[int, str], hidden: Tensor) -> Tensor | None:
        tokens = self.tokens
        if tokens is None:
            raise PersonascopeError("a persona hook ran outside a forward pass of the model it was added to")
        changed = None
        for _, op in self._ops.get(slot, ()):
            out = op(hidden, tokens)
            if out is not None:
                hidden = changed = out
        if self._stop_keys and self._is_last_slot(slot):
            raise StopForward
        return changed

    def _output_hook(self, slot: tuple[int, str]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = output if isinstance(output, Tensor) else output[0]
            new = self._run(slot, hidden)
            if new is None:
                return None
            return new if isinstance(output, Tensor) else (new, *output[1:])

        return hook

    def _input_hook(self, slot: tuple[int, str]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            new = self._run(slot, hidden)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def _on_stack_call(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        batch, length = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            positions = (mask.long().cumsum(-1) - 1)[:, -length:]
            valid = mask[:, -length:].bool()
        else:
            # A static cache (compiled decoding) gets a 4-D mask [B, 1, T, S] and per-row position ids. Read
            # both on the device: asking the cache for its length would be a host sync and a graph break.
            if isinstance(position_ids, Tensor) and position_ids.dim() == 2:
                positions = position_ids
            else:
                past = _past_length(kwargs)
                positions = torch.arange(past, past + length, device=ref.device).expand(batch, length)
            if isinstance(mask, Tensor) and mask.dim() == 4:
                allowed = mask if mask.dtype == torch.bool else mask == 0
                valid = allowed.any(-1).all(1)  # a padding query attends to nothing
            else:
                valid = torch.ones(batch, length, dtype=torch.bool, device=ref.device)
        if self._explicit_lengths:
            lengths = self._explicit_lengths[-1]
        else:
            # A row whose first real token (position 0) is in this call starts here: everything up to this
            # call's last token is its prompt. Other rows keep the length found at their first call.
            starts = ((positions == 0) & valid).any(-1)
            stored = self._prefill_lengths
            if stored is None or stored.shape[0] != batch:
                stored = positions[:, 0].clamp(min=0)
            lengths = torch.where(starts, positions[:, -1] + 1, stored)
            if not torch.compiler.is_compiling():
                # A compiled (decoding) step must not keep its output: CUDA graphs reuse that memory.
                self._prefill_lengths = lengths
        self.tokens = TokenContext(valid=valid, positions=positions, prompt_lengths=lengths)


def _past_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple cache


# -- handles --------------------------------------------------------------------------------------------


class HookHandle:
    """Operations added to a model; `remove()` them, or use the handle as a context manager."""

    def __init__(self, manager: HookManager, keys: list[int], prompt_lengths: bool = False) -> None:
        self._manager = manager
        self._keys = keys
        self._prompt_lengths = prompt_lengths
        self._removed = False

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for key in self._keys:
            self._manager.remove(key)
        if self._prompt_lengths:
            self._manager.pop_prompt_lengths()

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _add_ops(
    model: ModelHandle | nn.Module,
    ops: list[tuple[int, Operation, str]],
    prompt_lengths: Sequence[int] | Tensor | None,
) -> tuple[HookManager, list[int]]:
    manager = HookManager.of(model)
    for layer, _, _ in ops:
        manager.check_layer(layer)
    keys = [manager.add(layer, op, site=site) for layer, op, site in ops]  # type: ignore[arg-type]
    if prompt_lengths is not None:
        manager.push_prompt_lengths(prompt_lengths)
    return manager, keys


# -- interventions --------------------------------------------------------------------------------------


def _direction(vector: PersonaVector | Tensor, layer: int, manager: HookManager) -> Tensor:
    """Row `layer` of a `PersonaVector` or an `[L+1, d]` tensor, or a `[d]` tensor itself, checked."""
    from personascope.vector import PersonaVector

    tensor = vector.directions if isinstance(vector, PersonaVector) else torch.as_tensor(vector)
    if isinstance(vector, PersonaVector):
        vector.check_model(manager.model)
    if tensor.dim() == 2:
        if tensor.shape[0] != manager.num_layers + 1:
            raise PersonascopeError(
                f"vector has {tensor.shape[0]} rows but this model needs {manager.num_layers + 1} "
                f"(layers 0..{manager.num_layers}): it was made for another model"
            )
        tensor = tensor[layer]
    if tensor.dim() != 1 or tensor.shape[0] != hidden_size(manager.model):
        raise PersonascopeError(
            f"vector has shape {tuple(tensor.shape)} but this model's hidden size is {hidden_size(manager.model)}"
        )
    if not torch.isfinite(tensor).all():
        raise PersonascopeError(f"vector at layer {layer} contains NaN or infinite values")
    if float(tensor.norm()) == 0.0:
        raise PersonascopeError(f"vector at layer {layer} is all zeros: nothing to steer or project along")
    param = next(manager.model.parameters())
    return tensor.detach().to(device=param.device, dtype=torch.float32)


def _matching(tensor: Tensor, like: Tensor, cache: dict[tuple[torch.device, torch.dtype], Tensor]) -> Tensor:
    """`tensor` on `like`'s device and dtype, converted on first use only: a decoding step then makes no tensor
    from host values (a host-to-device copy waits for the GPU to finish its queue)."""
    key = (like.device, like.dtype)
    if key not in cache:
        cache[key] = tensor.to(device=like.device, dtype=like.dtype)
    return cache[key]


def add_op(direction: Tensor, coef: float | Tensor, scope: str) -> Operation:
    """`h + coef·v` at the tokens in `scope`; `coef` may be a `[B]` tensor (one coefficient per row)."""
    if isinstance(coef, Tensor):
        c = coef.detach().to(device=direction.device, dtype=torch.float32)
        shift = (c[:, None, None] if c.dim() == 1 else c) * direction
    else:
        shift = float(coef) * direction
    shifts: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def op(hidden: Tensor, tokens: TokenContext) -> Tensor:
        mask = tokens.scope_mask(scope)
        return torch.where(mask[..., None], hidden + _matching(shift, hidden, shifts), hidden)

    return op


def ablate_op(direction: Tensor, scope: str) -> Operation:
    """Remove the component along the unit direction at the tokens in `scope`."""
    return clamp_op(direction, 0.0, scope)


def clamp_op(direction: Tensor, value: float, scope: str) -> Operation:
    """Set the projection on the unit direction to `value` at the tokens in `scope`."""
    unit = direction / direction.norm()
    units: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def op(hidden: Tensor, tokens: TokenContext) -> Tensor:
        mask = tokens.scope_mask(scope)
        u = _matching(unit, hidden, units)
        projection = hidden @ u
        return torch.where(mask[..., None], hidden + (value - projection)[..., None] * u, hidden)

    return op


def steer(
    model: ModelHandle | nn.Module,
    vector: PersonaVector | Tensor,
    layer: int | Sequence[int],
    coef: float | Tensor = 1.0,
    scope: Scope = "response",
    *,
    mode: Literal["add", "ablate", "clamp"] = "add",
    value: float = 0.0,
    prompt_lengths: Sequence[int] | Tensor | None = None,
) -> HookHandle:
    """Steer `model` along `vector` at one or more layers, from now until the handle is removed.

    Args:
        model: a `ModelHandle` or a bare HF causal LM.
        vector: a `PersonaVector`, an `[L+1, d]` tensor (row `l` used at layer `l`) or a `[d]` tensor.
        layer: layer index or indices (HF `hidden_states` convention).
        coef: multiplier for `add`: a float, or a `[B]` tensor with one coefficient per row of the batch.
        scope: `prompt`, `response` or `all` tokens.
        mode: `add` (h + coef·v), `ablate` (remove the projection on v/|v|), `clamp` (set it to `value`).
        value: the projection `clamp` sets.
        prompt_lengths: prompt length per row, for teacher-forced passes over prompt + response. In
            `generate()` it is found from the first (prefill) call.

    Example:
        >>> with steer(handle, vec, layer=20, coef=4.0):
        ...     out = handle.model.generate(ids, max_new_tokens=40)
    """
    if scope not in SCOPES:
        raise PersonascopeError(f"unknown token scope {scope!r}: use one of {', '.join(SCOPES)}")
    manager = HookManager.of(model)
    layers = [layer] if isinstance(layer, int) else list(layer)
    ops: list[tuple[int, Operation, str]] = []
    for l in layers:
        manager.check_layer(l)
        direction = _direction(vector, l, manager)
        if mode == "add":
            ops.append((l, add_op(direction, coef, scope), "residual"))
        elif mode == "ablate":
            ops.append((l, ablate_op(direction, scope), "residual"))
        elif mode == "clamp":
            ops.append((l, clamp_op(direction, value, scope), "residual"))
        else:
            raise PersonascopeError(f"unknown steering mode {mode!r}: use add, ablate or clamp")
    manager, keys = _add_ops(model, ops, prompt_lengths)
    return HookHandle(manager, keys, prompt_lengths is not None)


# -- capture --------------------------------------------------------------------------------------------


class Capture(HookHandle):
    """Pooled activations at chosen layers, summed over every forward call while active.

    `mean(pool)` returns `[B, len(layers), d]` float32 (rows with no token in the pool are zero);
    `sums` and `counts` hold the running sums, so nothing per token is kept.
    """

    def __init__(self, manager: HookManager, layers: list[int], pools: list[str]) -> None:
        super().__init__(manager, [])
        self.layers = layers
        self.pools = pools
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def _accumulate(self, index: int) -> Operation:
        def op(hidden: Tensor, tokens: TokenContext) -> None:
            for pool in self.pools:
                mask = tokens.pool_mask(pool)
                summed = torch.einsum("bt,btd->bd", mask.to(hidden.dtype), hidden.detach()).float()
                if pool not in self.sums:
                    batch, width = summed.shape
                    self.sums[pool] = torch.zeros(batch, len(self.layers), width, device=hidden.device)
                    self.counts[pool] = torch.zeros(batch, len(self.layers), device=hidden.device)
                self.sums[pool][:, index] += summed
                self.counts[pool][:, index] += mask.sum(-1)
            return None

        return op

    def mean(self, pool: str = "response_avg") -> Tensor:
        if pool not in self.sums:
            raise PersonascopeError(f"nothing was captured for {pool!r}: captured pools are {self.pools}")
        return self.sums[pool] / self.counts[pool].clamp(min=1)[..., None]


def capture(
    model: ModelHandle | nn.Module,
    layers: int | Sequence[int],
    pools: str | Sequence[str] = ("response_avg",),
    *,
    prompt_lengths: Sequence[int] | Tensor | None = None,
    stop_after: bool = False,
) -> Capture:
    """Capture pooled activations at `layers` (HF `hidden_states` indices) until the handle is removed.

    Args:
        pools: any of `response_avg`, `prompt_avg`, `prompt_last`.
        prompt_lengths: prompt length per row when the input holds prompt + response.
        stop_after: end forward passes after the deepest hooked layer (call the model with `run_forward`).

    Example:
        >>> with capture(handle, [10, 20], "response_avg", prompt_lengths=lens) as cap:
        ...     run_forward(handle, input_ids=ids, attention_mask=mask)
        >>> cap.mean("response_avg").shape  # [B, 2, d]
    """
    manager = HookManager.of(model)
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    pool_list = [pools] if isinstance(pools, str) else list(pools)
    for pool in pool_list:
        if pool not in POOLS:
            raise PersonascopeError(f"unknown pooling {pool!r}: use one of {', '.join(POOLS)}")
    cap = Capture(manager, layer_list, pool_list)
    ops = [(layer, cap._accumulate(i), "read") for i, layer in enumerate(layer_list)]
    manager, cap._keys = _add_ops(model, ops, prompt_lengths)
    cap._prompt_lengths = prompt_lengths is not None
    if stop_after:
        cap._keys.append(manager.add_stop())
    return cap


def run_forward(model: ModelHandle | nn.Module, **inputs: Any) -> Any:
    """Call the model with `inputs` under `inference_mode`, returning None when a hook stopped it early."""
    module = as_module(model)
    with torch.inference_mode():
        try:
            return module(**inputs, use_cache=False)
        except StopForward:
            return None
