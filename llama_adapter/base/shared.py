"""SharedBase: one frozen model and its tokenizer, and the named adapters on it.

Adapters never become part of the base's module tree: each owns its modules (registered with torch under its own
`LlamaAdapterModel`, so `.train()`, `.to()`, `.parameters()` and `state_dict` see them), and the base only gets hooks
(routing.py) that run, at every call, the modules of the adapters that call names for its rows (`routing.Call`).
Adding an adapter installs the hooks it needs; removing the last one removes the hooks and the attention routing, so
the model is again exactly what was loaded. Nothing here says which adapter is active: each call says which adapter it runs.

`reserved()` gives a call the base to itself (one batch at a time, and a training step's forward and backward
passes as one). It is held by the call, not the thread: a thread the call starts in a copy of its context holds it
too, so a call that hands its work to a thread (streaming generation) never waits for itself.
"""

import contextvars
import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from torch import nn

from . import routing, structure

_ATTRIBUTE = "_llama_adapter_shared_base"  # where a model object keeps its SharedBase
_RESERVED: contextvars.ContextVar[tuple] = contextvars.ContextVar("llama_adapter_reserved", default=())


class SharedBase:
    """The frozen base of one or more adapters; there is one per model object (`SharedBase.of`)."""

    def __init__(self, model: nn.Module, tokenizer):
        structure.check_architecture(model)
        self.model = model
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self.adapters: dict[str, nn.Module] = {}  # name -> Method, in the order they were added
        self._placed: dict[nn.Module, dict[str, nn.Module]] = {}  # Method -> its modules by decoder path, read once
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
        """Put a new adapter on the base; returns its name (default: its method's)."""
        with self.reserved():
            name = name or self._free_name(method.name)
            if name in self.adapters:
                raise ValueError(f"an adapter named {name!r} is on this base already")
            if not self.can_take(method):
                other = next(iter(self.adapters.values()))
                raise ValueError(f"a {method.name} adapter cannot share a base with a {other.name} adapter")
            method.attach()
            placed = dict(method.placements())
            for path in placed:
                if routing.is_attention(self.model, path) and self._own_attention is None:
                    self._own_attention = routing.route_attention(self.model)
                if path not in self._hooks:
                    self._hooks[path] = routing.hook_module(self.model, path)
            self.adapters[name], self._placed[method] = method, placed
            return name

    def can_take(self, method) -> bool:
        """Whether an adapter of `method` (a Method or its class) can be added: a base takes turns only between
        adapters that all leave its modules alone."""
        return not self.adapters or (method.shares_base and all(m.shares_base for m in self.adapters.values()))

    def remove(self, name: str) -> None:
        """Take an adapter off the base; once none is left, the base is exactly the model that was loaded."""
        with self.reserved():
            if name not in self.adapters:
                raise ValueError(f"no adapter named {name!r} is on this base: it has been taken off already (unload)")
            method = self.adapters.pop(name)
            del self._placed[method]
            method.detach()
            needed = {path for placed in self._placed.values() for path in placed}
            for path in list(self._hooks):
                if path not in needed:
                    self._hooks.pop(path).remove()
            if self._own_attention is not None and not any(routing.is_attention(self.model, p) for p in needed):
                routing.restore_attention(self.model, self._own_attention)
                self._own_attention = None

    # ------------------------------------------------------------------------------------------------------
    # Calls

    @contextmanager
    def reserved(self) -> Iterator[None]:
        """Within this block no other call runs on the base (see the module's note: held by the call)."""
        if self in _RESERVED.get():
            yield
            return
        with self._lock:
            token = _RESERVED.set((*_RESERVED.get(), self))
            try:
                yield
            finally:
                _RESERVED.reset(token)

    def placements(self, method: nn.Module) -> dict[str, nn.Module]:
        """`method`'s modules by decoder path, as it was added: what a call of it runs. Refused once it is removed."""
        if method not in self._placed:
            raise ValueError(f"this {method.name} adapter has been removed from its base (unload)")
        return self._placed[method]

    @contextmanager
    def running(self, parts: Sequence[routing.Part]) -> Iterator[None]:
        """Within this block, calls of the base run these parts (their rows, each its adapter; inside `disabled()`, the
        plain model), and no other call runs on the base."""
        with self.reserved():
            call = routing.current_call()
            with routing.calling(call if call.disabled else routing.Call(tuple(parts))):
                yield

    @contextmanager
    def use(self, method: nn.Module) -> Iterator[None]:
        """Within this block, calls of the base that name no adapter (`model.base(...)`, its `generate`) run `method`'s;
        no other call runs on the base. Calls through an adapter model still run their own adapter."""
        with self.reserved():
            with routing.calling(routing.Call((routing.Part(self.placements(method)),))):
                yield

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block every call of the base runs the plain model, those through an adapter model too."""
        with self.reserved(), ExitStack() as stack:
            if not routing.current_call().disabled:  # an inner block must not undo an outer one's PEFT switch
                for method in self.adapters.values():
                    stack.enter_context(method.disabled())
            stack.enter_context(routing.calling(routing.Call(disabled=True)))
            yield

    def _free_name(self, stem: str) -> str:
        return next(
            name for n in itertools.count(1) if (name := stem if n == 1 else f"{stem}-{n}") not in self.adapters
        )
