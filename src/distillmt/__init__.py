"""distillmt: compress an LLM translator by knowledge distillation.

The Python API (:mod:`distillmt.api`): ``distillmt.run(config, **overrides)`` runs an experiment and returns its
table as data, ``distillmt.translate(sources, run_folder_or_export, system)`` translates with one of its models,
``distillmt.load_config(path, overrides)`` reads a config. They are imported on first use, so ``import distillmt``
stays cheap (no torch).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Results", "load_config", "run", "translate"]


def __getattr__(name: str) -> Any:
    if name == "load_config":
        from distillmt.config import load_config

        return load_config
    if name in ("Results", "run", "translate"):
        from distillmt import api

        return getattr(api, name)
    raise AttributeError(f"module 'distillmt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
