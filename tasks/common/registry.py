"""Registries by name: models, datasets and losses are looked up by a short string.

Adding a method means adding a module that registers itself; no pipeline changes. Lookups import
the modules that register (``_PROVIDERS``) lazily, so ``get_model("squeezenet1_1")`` works without the
caller importing ``tasks.squeezenet`` first.
"""
from __future__ import annotations

import importlib
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

# kind -> modules whose import registers entries of that kind
_PROVIDERS: dict[str, tuple[str, ...]] = {
    "model": ("tasks.squeezenet", "tasks.mlp", "tasks.minimoe", "tasks.text_models", "tasks.legendretron",
              "tasks.lenet", "tasks.byte_lm"),
    "dataset": ("tasks.common.datasets", "tasks.common.text", "tasks.common.tables", "tasks.byte_lm"),
    "loss": ("tasks.common.losses", "tasks.kd", "tasks.minimoe", "tasks.squentropy", "tasks.ensloss"),
}
_REGISTRIES: dict[str, dict[str, Callable]] = {kind: {} for kind in _PROVIDERS}


def _register(kind: str, name: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        table = _REGISTRIES[kind]
        if name in table and table[name] is not fn:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = fn
        return fn

    return deco


def register_model(name: str) -> Callable[[F], F]:
    return _register("model", name)


def register_dataset(name: str) -> Callable[[F], F]:
    return _register("dataset", name)


def register_loss(name: str) -> Callable[[F], F]:
    return _register("loss", name)


def _load_providers(kind: str) -> None:
    for module in _PROVIDERS[kind]:
        importlib.import_module(module)


def names(kind: str) -> list[str]:
    _load_providers(kind)
    return sorted(_REGISTRIES[kind])


def lookup(kind: str, name: str) -> Callable:
    _load_providers(kind)
    try:
        return _REGISTRIES[kind][name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRIES[kind])) or "none"
        raise KeyError(f"unknown {kind} {name!r}; registered: {known}") from None


def get_model(name: str, **kwargs):
    return lookup("model", name)(**kwargs)


# constructor arguments a model may take from the data rather than from its config
DATA_KWARGS = ("num_classes", "in_channels", "in_features")


def data_kwargs(name: str, input_shape: tuple[int, ...], num_classes: int) -> dict[str, int]:
    """The dataset-derived constructor arguments that model ``name`` accepts.

    Convolutional models take ``in_channels``; models that flatten their input take ``in_features``
    (the product of the input shape); every classifier takes ``num_classes``.
    """
    import inspect
    import math

    offered = {"num_classes": num_classes, "in_channels": input_shape[0],
               "in_features": math.prod(input_shape)}
    params = inspect.signature(lookup("model", name)).parameters
    return {k: v for k, v in offered.items() if k in params}
