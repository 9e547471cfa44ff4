"""bitsandbytes loads only when quantisation is asked for.

PEFT imports bitsandbytes at its own import whenever it is installed (``peft/helpers.py``), and bitsandbytes
(>= 0.50) then logs on every import, on CPUs with AVX512-BF16, that the ``kernels`` package or its hub download
is missing ("Skipping publisher trust check ...", "Failed to load CPU gemm_4bit_forward ...") before using its
own CPU kernel: nothing for a user to do, in every run, quantised or not.

So until something uses it, ``sys.modules["bitsandbytes"]`` is a stand-in that carries the real module's spec
(``importlib.util.find_spec`` still answers "installed", as PEFT and transformers ask) and imports the real
module on the first attribute it is asked for (``bnb.nn``, a submodule import, ``quantization.py``'s backend
check), with those two loggers quiet during that import. Then the stand-in forwards every attribute to the real
module, now in ``sys.modules``. A run without ``model.quantization`` never loads it, except through PEFT's own
LoRA / AdaLoRA (the ``lora`` and ``adalora`` methods), whose layer dispatch asks ``bnb.nn`` for its classes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from typing import Any

__all__ = ["defer_import"]

#: the loggers of the import-time lines above (bitsandbytes' CPU backend; the ``kernels`` hub download)
_NOISY = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


class _Deferred(types.ModuleType):
    """A module that imports the real one on first attribute access (no ``__path__`` until then)."""

    def __init__(self, name: str, spec: Any) -> None:
        super().__init__(name)
        self.__spec__ = spec
        self.__loader__ = spec.loader
        self.__file__ = spec.origin

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr != "__path__":   # looked up on every module (inspect.getmodule, ...)
            raise AttributeError(attr)
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
            loggers = [logging.getLogger(n) for n in _NOISY]
            levels = [logger.level for logger in loggers]
            try:
                for logger in loggers:
                    logger.setLevel(logging.ERROR)
                real = importlib.import_module(name)
            except BaseException:
                sys.modules[name] = self
                raise
            finally:
                for logger, level in zip(loggers, levels):
                    logger.setLevel(level)
            self.__dict__["_real"] = real
        real = self.__dict__.get("_real") or sys.modules[name]
        return getattr(real, attr)


def defer_import(name: str) -> None:
    """Put a stand-in for installed, not yet imported module ``name`` into ``sys.modules`` (see the docstring)."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None or spec.loader is None:
        return
    sys.modules[name] = _Deferred(name, spec)


defer_import("bitsandbytes")
