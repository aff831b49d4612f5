"""SharedBase: one frozen model and its tokenizer, and the named adapters that take turns on it.

Adapters never become part of the base's module tree: each owns its modules (registered with torch under its own
`LlamaAdapterModel`, so `.train()`, `.to()`, `.parameters()` and `state_dict` see them whether or not it is the
active one), and the base only gets hooks (hf.py) that ask this object, at every call, which adapter module to run.
Adding an adapter installs the hooks it needs; activating one makes the hooks run its modules; removing the last
adapter removes the hooks and the attention routing, so the model is again exactly what was loaded. All of that
happens under `lock`, which is held for the whole of each call on the base: one batch at a time.

An adapter stays active after its call, so that a backward pass with gradient checkpointing recomputes each layer
with the adapter it ran with: train one adapter of a base at a time.
"""

import itertools
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

from torch import nn

from . import hf

_ATTRIBUTE = "_llama_adapter_shared_base"  # where a model object keeps its SharedBase


class SharedBase:
    """The frozen base of one or more adapters; there is one per model object (`SharedBase.of`)."""

    def __init__(self, model: nn.Module, tokenizer):
        hf.check_architecture(model)
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.RLock()
        self.adapters: dict[str, nn.Module] = {}  # name -> Method, in the order they were added
        self._active: nn.Module | None = None
        self._placed: dict[str, nn.Module] = {}  # the active adapter's modules by path in the decoder
        self._hooks: dict[str, object] = {}  # path -> handle of the hook installed there
        self._own_attention: str | None = None  # the model's attention implementation while ours is routed in

    @classmethod
    def of(cls, model: nn.Module, tokenizer) -> "SharedBase":
        """The SharedBase of `model`, made on first use: adapters built on one model object always share it.

        It is kept on the model object itself (outside its module tree), so the two live and go together.
        """
        shared = model.__dict__.get(_ATTRIBUTE)
        if shared is None:
            shared = cls(model, tokenizer)
            model.__dict__[_ATTRIBUTE] = shared
        return shared

    # ------------------------------------------------------------------------------------------------------
    # The registry

    def add(self, method: nn.Module, name: str | None = None) -> str:
        """Put a new adapter on the base and make it the active one; returns its name (default: its method's)."""
        with self.lock:
            name = name or self._free_name(method.name)
            if name in self.adapters:
                raise ValueError(f"an adapter named {name!r} is on this base already")
            if not self.can_take(method):
                other = next(iter(self.adapters.values()))
                raise ValueError(f"a {method.name} adapter cannot share a base with a {other.name} adapter")
            method.attach()
            for path in method.placements():
                if hf.is_attention(self.model, path) and self._own_attention is None:
                    self._own_attention = hf.route_attention(self.model)
                if path not in self._hooks:
                    self._hooks[path] = hf.hook_module(self.model, path, partial(self._placed.get, path))
            self.adapters[name] = method
            self._activate(method)
            return name

    def can_take(self, method) -> bool:
        """Whether an adapter of `method` (a Method or its class) can be added: a base takes turns only between
        adapters that all leave its modules alone."""
        return not self.adapters or (method.shares_base and all(m.shares_base for m in self.adapters.values()))

    def remove(self, name: str) -> None:
        """Take an adapter off the base; once none is left, the base is exactly the model that was loaded."""
        with self.lock:
            if name not in self.adapters:
                raise ValueError(f"no adapter named {name!r} is on this base: it has been taken off already (unload)")
            method = self.adapters.pop(name)
            if self._active is method:
                self._activate(None)
            method.detach()
            needed = {path for other in self.adapters.values() for path in other.placements()}
            for path in list(self._hooks):
                if path not in needed:
                    self._hooks.pop(path).remove()
            if self._own_attention is not None and not any(hf.is_attention(self.model, p) for p in needed):
                hf.restore_attention(self.model, self._own_attention)
                self._own_attention = None

    # ------------------------------------------------------------------------------------------------------
    # Taking turns

    @contextmanager
    def use(self, method: nn.Module) -> Iterator[None]:
        """Within this block the base runs with `method`'s adapter, and no other call runs on the base."""
        with self.lock:
            if method not in self.adapters.values():
                raise ValueError(f"this {method.name} adapter has been removed from its base (unload)")
            self._activate(method)
            yield

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block the base runs as the plain model, with no adapter."""
        with self.lock, ExitStack() as stack:
            active = self._active
            self._activate(None)
            for method in self.adapters.values():
                stack.enter_context(method.disabled())
            try:
                yield
            finally:
                self._activate(active)

    def _activate(self, method: nn.Module | None) -> None:
        if method is self._active:  # every call activates its adapter: most find it in place already
            return
        self._active = method
        self._placed.clear()
        self._placed.update(method.placements() if method is not None else {})

    def _free_name(self, stem: str) -> str:
        return next(
            name for n in itertools.count(1) if (name := stem if n == 1 else f"{stem}-{n}") not in self.adapters
        )
