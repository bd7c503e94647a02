"""The one mechanism for touching the residual stream: capture and interventions at chosen layers."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from personascope.errors import PersonascopeError
from personascope.io.layers import check_layer
from personascope.model import (
    ModelHandle,
    as_module,
    backbone,
    decoder_layers,
    final_norm,
    unwrap,
)

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

    Masks are made once per forward call and device, and shared by the operations of every layer (a model split
    over several devices gets each layer's masks on that layer's device).
    """

    valid: Tensor
    positions: Tensor
    prompt_lengths: Tensor
    _masks: dict[tuple[str, torch.device], Tensor] = field(default_factory=dict, init=False, repr=False,
                                                           compare=False)

    def _on(self, key: str, device: torch.device | None) -> Tensor:
        """The mask `key` on `device` (made there from the stack's copy on first use)."""
        home = self._masks[(key, self.valid.device)]
        if device is None or device == home.device:
            return home
        if (key, device) not in self._masks:
            self._masks[(key, device)] = home.to(device, non_blocking=True)
        return self._masks[(key, device)]

    def scope_mask(self, scope: str, device: torch.device | None = None) -> Tensor:
        """`prompt`: the chat prompt; `response`: positions whose outputs produce response tokens (the last
        prompt position and every response position); `all`: every real token. On `device` if given."""
        key = (f"scope:{scope}", self.valid.device)
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
        return self._on(key[0], device)

    def pool_mask(self, pool: str, device: torch.device | None = None) -> Tensor:
        """`response_avg`: the response tokens; `prompt_avg`: the prompt tokens; `prompt_last`: the last one."""
        key = (f"pool:{pool}", self.valid.device)
        if key not in self._masks:
            lengths = self.prompt_lengths[:, None]
            if pool == "response_avg":
                self._masks[key] = self.valid & (self.positions >= lengths)
            elif pool == "prompt_avg":
                self._masks[key] = self.valid & (self.positions < lengths)
            elif pool == "prompt_last":
                self._masks[key] = self.valid & (self.positions == lengths - 1)
            else:
                check_pools([pool])
        return self._on(key[0], device)


def check_pools(pools: Sequence[str]) -> list[str]:
    """The pool names as a list; one error naming the valid ones for an unknown name."""
    for pool in pools:
        if pool not in POOLS:
            raise PersonascopeError(f"unknown pooling {pool!r}: use one of {', '.join(POOLS)}")
    return list(pools)


Operation = Callable[[Tensor, TokenContext], "Tensor | None"]


class StopForward(Exception):
    """Raised by a hook once the deepest layer anyone needs has run; `run_forward` catches it."""


class HookManager:
    """The hooks of one decoder stack. Get it with `HookManager.of(model)`; add operations with `add`.

    A PEFT model and its base share their decoder layers, so they share one manager. The manager holds the model
    only weakly: a model nobody else holds is freed with its hooks.
    """

    _managers: weakref.WeakKeyDictionary[nn.Module, HookManager] = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module) -> None:
        # Dynamo skips guards on module hooks by default, so a model compiled before an operation was added
        # would go on running its old graph without it; guarding makes a change of hooks recompile instead.
        # (transformers has imported torch._dynamo by the time a model exists, so this costs nothing.)
        import torch._dynamo

        torch._dynamo.config.skip_nnmodule_hook_guards = False
        self._model = weakref.ref(model)
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self._norm = final_norm(model)
        self._stack = backbone(model)
        self._ops: dict[tuple[int, str], list[tuple[int, Operation]]] = {}
        self._handles: dict[tuple[int, str], torch.utils.hooks.RemovableHandle] = {}
        self._root_handle: torch.utils.hooks.RemovableHandle | None = None
        self._explicit_lengths: list[tuple[int, Tensor]] = []
        self._prefill_lengths: Tensor | None = None
        self._next_id = 0
        self._stop_keys: set[int] = set()
        self.tokens: TokenContext | None = None

    @classmethod
    def of(cls, model: ModelHandle | nn.Module) -> HookManager:
        """The manager of `model`'s decoder stack (the same for a PEFT wrapper and the model inside it)."""
        module = unwrap(as_module(model))
        manager = cls._managers.get(module)
        if manager is None:
            manager = cls._managers[module] = cls(module)
        return manager

    @property
    def model(self) -> nn.Module:
        """The transformers model (inside any PEFT wrapper) whose layers this manager hooks."""
        model = self._model()
        if model is None:
            raise PersonascopeError("the model of this hook manager was freed")
        return model

    # -- registration -----------------------------------------------------------------------------------

    def check_layer(self, layer: int) -> int:
        return check_layer(layer, self.num_layers)

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

    def push_prompt_lengths(self, lengths: Sequence[int] | Tensor) -> int:
        """Fix the prompt length of each row (for teacher-forced passes over prompt + response) until
        `pop_prompt_lengths(key)`; the latest pushed entry still present applies."""
        key = self._next_id
        self._next_id += 1
        self._explicit_lengths.append((key, torch.as_tensor(lengths, dtype=torch.long)))
        return key

    def pop_prompt_lengths(self, key: int) -> None:
        """Remove the entry `push_prompt_lengths` returned `key` for, wherever it is in the stack."""
        self._explicit_lengths = [(k, t) for k, t in self._explicit_lengths if k != key]

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
            key, lengths = self._explicit_lengths[-1]
            if lengths.device != ref.device:  # moved once, where the input ids are
                lengths = lengths.to(ref.device)
                self._explicit_lengths[-1] = (key, lengths)
        else:
            # A call of several tokens is a prefill: a new prompt, or a new turn appended to a cached
            # conversation; everything up to its last token is prompt. A row whose first real token (position 0)
            # is in this call starts here too. Otherwise (one-token decoding steps) rows keep their length.
            starts = ((positions == 0) & valid).any(-1) | (length > 1)
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

    def __init__(self, manager: HookManager, keys: list[int], prompt_lengths: int | None = None) -> None:
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
        if self._prompt_lengths is not None:
            self._manager.pop_prompt_lengths(self._prompt_lengths)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def add_ops(
    model: ModelHandle | nn.Module,
    ops: list[tuple[int, Operation, str]],
    prompt_lengths: Sequence[int] | Tensor | None,
) -> tuple[HookManager, list[int], int | None]:
    """Add `(layer, op, site)`s (and prompt lengths) to `model`'s manager; returns it, the operations' keys and
    the prompt-lengths key (None without lengths)."""
    manager = HookManager.of(model)
    for layer, _, _ in ops:
        manager.check_layer(layer)
    keys = [manager.add(layer, op, site=site) for layer, op, site in ops]  # type: ignore[arg-type]
    lengths_key = None if prompt_lengths is None else manager.push_prompt_lengths(prompt_lengths)
    return manager, keys, lengths_key
