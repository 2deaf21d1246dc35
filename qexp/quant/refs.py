"""Module attributes that point at other modules without owning them."""

from __future__ import annotations

from typing import Any

from torch import nn


def keep_reference(module: nn.Module, name: str, value: Any) -> None:
    """Set ``module.<name> = value`` as a plain reference, bypassing nn.Module's registration.

    For a module reference that must not become a submodule (the estimator a layer calls, the
    model and partner an estimator trains with): it stays out of ``state_dict``, ``.modules()``
    and ``.parameters()``, so nothing is saved, moved or optimised twice and no reference cycle
    enters the module tree. Read it back as a plain attribute (``module.<name>``).
    """
    object.__setattr__(module, name, value)
