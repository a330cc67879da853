"""A process-wide revision number of what models hand the CPU kernel.

The fast path's decoder builds each layer's whole-layer kernel (server/engine/vnni.py's
DecodeLayer) from its modules' packed weights, LoRA blocks and norms, and holds pointers
into them. It used to make sure before every layer of every step that those were still
the ones it was built from: 7 modules and 6 norms looked up per layer, 0.5-0.6 ms a step
of Gemma 3 270M (about 5 % of a one-row step). It now looks at this number once a step,
and looks again in full only when the number has moved.

The number moves on every change to what a layer hands the kernel:
- a module, parameter or buffer assigned on any module (torch's global registration
  hooks): an adapter kind wrapping or unwrapping a layer, a norm replaced;
- our modules' own plain attributes that the kernel reads (``Watched``): LoRA blocks
  packed again as adapters come and go, a layer packed for the kernel.
What changes from one forward to the next (which rows have an adapter) is asked of the
modules every step (``kernel_plan``), not counted here. A change that none of this sees
(a tensor's storage swapped in place under a kernel that points at it) was not seen by
the per-layer look either.
"""

from __future__ import annotations

import itertools
from typing import Any

from torch.nn.modules import module as _module

_counter = itertools.count(1)  # next() is atomic under the GIL
_revision = 0


def current() -> int:
    return _revision


def bump(*_: Any) -> None:
    """A new revision (a value never taken before). Returns None: torch's registration
    hooks call it and would take anything else for a replacement value."""
    global _revision
    _revision = next(_counter)


class Watched:
    """A mixin for modules whose plain attributes named in ``_kernel_inputs`` are read by
    the CPU kernel's layers: assigning one bumps the revision (after the assignment)."""

    _kernel_inputs: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)  # type: ignore[misc]
        if name in self._kernel_inputs:
            bump()


_module.register_module_module_registration_hook(bump)
_module.register_module_parameter_registration_hook(bump)
_module.register_module_buffer_registration_hook(bump)
