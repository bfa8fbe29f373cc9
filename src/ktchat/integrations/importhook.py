"""Run a callback right after a named module has executed, before anything else can import names from it.

`when_imported("pkg.mod", patch)` registers `patch(module)`: called at once if the module is already imported,
else by a finder on `sys.meta_path` that wraps that one module's loader. The finder answers None for every
other name (a set lookup), so it costs nothing to import it at interpreter start; it never loads a module
itself and gives the module its own loader back before running it (tracebacks and `inspect` see the real one).
A callback that raises is logged and skipped: a hook must never break the program it hooks into.
"""

from __future__ import annotations

import importlib.util
import sys
import threading


class _Finder:
    """A meta path finder that only ever wraps the loaders of the modules it watches."""

    def __init__(self):
        self.callbacks: dict = {}  # module name -> [callback(module)]
        self._local = threading.local()  # names whose spec this thread is looking up (no recursion)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.callbacks:
            return None
        busy = self._local.__dict__.setdefault("busy", set())
        if fullname in busy:
            return None
        busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the finders after us decide where it comes from
        finally:
            busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, self.callbacks[fullname])
        return spec


class _Loader:
    """Delegates to the module's own loader, then runs the callbacks on the executed module."""

    def __init__(self, loader, callbacks: list):
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _run(self._callbacks, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _run(callbacks: list, module) -> None:
    for callback in list(callbacks):
        try:
            callback(module)
        except Exception:  # noqa: BLE001 - logged; the hooked program goes on as without the hook
            import logging

            logging.getLogger(__name__).warning("ktchat: hook %s on %s failed; %s runs without it",
                           getattr(callback, "__qualname__", callback), module.__name__, module.__name__,
                           exc_info=True)


_finder = _Finder()
_lock = threading.Lock()


def when_imported(name: str, callback) -> None:
    """Call `callback(module)` once `name` has been imported (now, if it already is)."""
    with _lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        _finder.callbacks.setdefault(name, []).append(callback)
        module = sys.modules.get(name)
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False) is False:
        _run([callback], module)
