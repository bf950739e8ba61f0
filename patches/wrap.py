"""How every patch replaces a vLLM function: once, with the original one call away.

`wrap_once(owner, name)` decorates `replacement(original, *args, **kwargs)` and installs a
function that calls it with vLLM's original, so `apply()` stays idempotent (a second call sees
the mark and leaves the patch in place), the original stays reachable as `__wrapped__` (tests call
it to show what vLLM alone does), and a classmethod stays a classmethod. Functions that vLLM
modules imported by name are also replaced in each module named in `users`; the owner is always
replaced, since the mark is read there. The mark is the plugin's own, not `__wrapped__`: an
original that vLLM itself wrapped already has one.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

MARK = "__blockdiff__"


def wrap_once(owner: Any, name: str, *, users: Iterable[str] = ()
              ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def install(replacement: Callable[..., Any]) -> Callable[..., Any]:
        static = inspect.getattr_static(owner, name)
        is_classmethod = isinstance(static, classmethod)
        original = static.__func__ if is_classmethod else getattr(owner, name)
        if getattr(original, MARK, False):
            return replacement

        @functools.wraps(original)
        def patched(*args: Any, **kwargs: Any) -> Any:
            return replacement(original, *args, **kwargs)

        setattr(patched, MARK, True)
        value = classmethod(patched) if is_classmethod else patched
        for target in (owner, *(importlib.import_module(module) for module in users)):
            setattr(target, name, value)
        return replacement

    return install
