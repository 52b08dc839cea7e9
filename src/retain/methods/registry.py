"""The method registry: `@register("name")` makes a method available by name to configs and the CLI."""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Callable
from typing import Any

from retain.config import build_dataclass
from retain.errors import RetainError, did_you_mean
from retain.methods.base import ContinualMethod
from retain.methods.combine import Combined

_METHODS: dict[str, type[ContinualMethod]] = {}


def register(
    name: str, config: type | None = None
) -> Callable[[type[ContinualMethod]], type[ContinualMethod]]:
    """Class decorator: register a ContinualMethod subclass under `name` with its config dataclass."""

    def wrap(cls: type[ContinualMethod]) -> type[ContinualMethod]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        cls.config_cls = config
        doc = (cls.__doc__ or "").strip()
        cls.summary = doc.splitlines()[0] if doc else ""
        _METHODS[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    """Import every module of this package once: each method file registers itself on import."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules([os.path.dirname(__file__)]):
        if module.name not in ("base", "registry", "combine") and not module.ispkg:
            importlib.import_module(f"{package}.{module.name}")


def available() -> dict[str, type[ContinualMethod]]:
    """Name -> class of every registered method."""
    _load_builtins()
    return dict(sorted(_METHODS.items()))


def get_method_class(name: str) -> type[ContinualMethod]:
    methods = available()
    if name not in methods:
        raise RetainError(
            f"unknown method '{name}'{did_you_mean(name, methods)}; available: {', '.join(methods)}"
        )
    return methods[name]


def build_method_config(name: str, params: dict[str, Any]) -> Any:
    """Validate `params` against the method's config dataclass (unknown keys get a did-you-mean)."""
    cls = get_method_class(name)
    if cls.config_cls is None:
        if params:
            raise RetainError(f"config: method '{name}' takes no settings, got {', '.join(params)}")
        return None
    return build_dataclass(cls.config_cls, params, "method")


def _plus_entries(plus: Any) -> list[tuple[str, dict[str, Any]]]:
    """`plus: [ewc, {name: lwf, temperature: 1.0}]` -> [(name, settings), ...]."""
    entries = plus if isinstance(plus, list) else [plus]
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            out.append((entry["name"], {k: v for k, v in entry.items() if k != "name"}))
        else:
            raise RetainError(
                f"config: method.plus entries are method names or {{name: ..., settings}}, got {entry!r}"
            )
    return out


def create_method(name: str, params: dict[str, Any] | None = None) -> ContinualMethod:
    """Instantiate a registered method with validated settings; `plus` in params combines methods."""
    params = dict(params or {})
    plus = params.pop("plus", None)
    main = get_method_class(name)(build_method_config(name, params))
    if not plus:
        return main
    extra = [get_method_class(n)(build_method_config(n, p)) for n, p in _plus_entries(plus)]
    return Combined([main, *extra])


def describe(cls: type[ContinualMethod]) -> list[tuple[str, Any, str]]:
    """(name, default, help) of each hyper-parameter of a method, for `retain methods`."""
    if cls.config_cls is None:
        return []
    rows = []
    for f in dataclasses.fields(cls.config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows


def _settings_of(method: ContinualMethod) -> dict[str, Any]:
    return dataclasses.asdict(method.config) if dataclasses.is_dataclass(method.config) else {}


def resolved_settings(method: ContinualMethod) -> dict[str, Any]:
    """Every setting of `method` as it runs, defaults included, in the form `method.params` takes:
    the main method's fields, and under `plus` one `{name, ...fields}` per further component."""
    main, *extra = method.components
    settings = _settings_of(main)
    if extra:
        settings["plus"] = [{"name": c.name, **_settings_of(c)} for c in extra]
    return settings
