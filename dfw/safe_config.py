"""Configs read from files are data, never code.

An export's attention config, the run config stored in a checkpoint and the data config that
`dfw.generate` rebuilds a tokenizer from may come from someone else. Handing them to Hydra's
`instantiate` would run whatever they name (`_target_: builtins.open` with `_args_` truncates a
file). So a stored node is checked before anything is built from it:

- `_target_` must name one of dfw's own classes of the expected kind (an attention core, a data
  module): a class under the `dfw` package that subclasses the kind's base class, looked up by name
  among the classes dfw has defined, so nothing the name points at is imported. New classes and
  new options pass without editing this module: the allow-list is dfw's own code.
- every other key must be an argument of that class (its signature), `_partial_` a bool; no other
  Hydra key (`_args_`, `_recursive_`, `_convert_`), no nested `_target_`, no interpolation;
- values are plain data (str, int, float, bool, None, lists and dicts of them).

Then the class is called directly (`functools.partial` for `_partial_: true`), not through Hydra.
An attention node's `softmax_layers` is the conversion's option, not the core's: `dfw.surgery` takes it out
before the node reaches this module and accepts only its plain forms (`dfw.surgery.softmax_layers`).
The same signature check names an unknown option of a config the user wrote (`+attention.stat_size=3`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import OmegaConf

from .errors import ConfigError

PLAIN = (str, int, float, bool, type(None))
# Keys a stored node may carry besides `_target_` and the target's arguments: its preset name.
DESCRIPTIVE_KEYS = frozenset({"name"})


class UnsafeConfigError(ConfigError):
    """A config read from a file names something that is not one of dfw's own classes and options."""


def plain(node: Any) -> Any:
    """`node` (DictConfig, ListConfig, dict, list) as plain Python containers, unresolved."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _kind_names(base: type) -> str:
    return f"dfw's own {base.__name__} classes"


# The modules that define the classes of each kind: dfw's own, imported before a stored name is looked up.
KIND_MODULES = {"AttentionCore": ("dfw.attention",), "LightningDataModule": ("dfw.data",)}


def own_classes(base: type) -> dict[str, type]:
    """dfw's own subclasses of `base` by every dotted name they are importable as (their module, and each
    package above it that exports them, e.g. both dfw.attention.fast_weight.X and dfw.attention.X)."""
    for module in KIND_MODULES.get(base.__name__, ()):
        importlib.import_module(module)
    found: dict[str, type] = {}
    stack = [base]
    while stack:
        for cls in stack.pop().__subclasses__():
            stack.append(cls)
            parts = cls.__module__.split(".")
            if parts[0] != "dfw" or not inspect.isclass(cls):
                continue
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
            for depth in range(1, len(parts)):
                package = sys.modules.get(".".join(parts[:depth]))
                if package is not None and getattr(package, cls.__name__, None) is cls:
                    found[f"{package.__name__}.{cls.__name__}"] = cls
    return found


def resolve_own_class(target: Any, base: type, where: str) -> type:
    """The class `target` names, if it is one of dfw's own subclasses of `base`; else UnsafeConfigError.

    Looked up by name among the classes dfw defines (`own_classes`): nothing that `target` names is
    imported, so naming a module with side effects (an entry point's __main__) runs nothing.
    """
    if not isinstance(target, str) or not (target == "dfw" or target.startswith("dfw.")):
        raise UnsafeConfigError(
            f"{where}._target_={target!r} refused: only {_kind_names(base)} may be named in a stored config"
        )
    cls = own_classes(base).get(target)
    if cls is None:
        raise UnsafeConfigError(f"{where}._target_={target!r} refused: not one of {_kind_names(base)}")
    return cls


def check_options(
    cls: Callable, options: Mapping[str, Any], where: str, ignore: frozenset = DESCRIPTIVE_KEYS
) -> None:
    """Every key of `options` is an argument of `cls` (a class or callable), else one ConfigError naming
    it."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = {name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(key for key in options if not key.startswith("_") and key not in accepted | ignore)
    if unknown:
        name = getattr(cls, "__name__", str(cls))
        raise ConfigError(
            f"{where}.{unknown[0]} is not an option of {name}; its options are {', '.join(sorted(accepted))}"
        )


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, str) and "${" in value:
        raise UnsafeConfigError(f"{where}={value!r} refused: a stored config may not hold interpolations")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "_target_":
                raise UnsafeConfigError(
                    f"{where}._target_ refused: a stored config may not name nested objects"
                )
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN):
        raise UnsafeConfigError(
            f"{where}: a stored config holds only plain values, got {type(value).__name__}"
        )


def checked_node(node: Any, base: type, source: str, option: str) -> tuple[type, dict[str, Any]]:
    """(class, options) of a node read from `source`, after the checks in this module's docstring.

    `option` is the node's place in the config (`attention`, `data`), used in the error messages,
    which all start with `source`.
    """
    node = plain(node)
    where = option
    try:
        if not isinstance(node, Mapping):
            raise UnsafeConfigError(f"{where}: expected a mapping, got {type(node).__name__}")
        cls = resolve_own_class(node.get("_target_"), base, where)
        for key, value in node.items():
            if not isinstance(key, str):
                raise UnsafeConfigError(f"{where}: key {key!r} refused")
            if key == "_partial_":
                if not isinstance(value, bool):
                    raise UnsafeConfigError(f"{where}._partial_={value!r} refused: true or false")
            elif key.startswith("_") and key != "_target_":
                raise UnsafeConfigError(
                    f"{where}.{key} refused: a stored config may only use _target_ and _partial_"
                )
            elif key != "_target_":
                _check_plain(value, f"{where}.{key}")
        check_options(cls, node, where)
    except ConfigError as err:
        raise type(err)(f"{source}: {err}") from None
    return cls, {k: v for k, v in node.items() if not k.startswith("_") and k not in DESCRIPTIVE_KEYS}


def build_checked(node: Any, base: type, source: str, option: str) -> Any:
    """Build a node read from `source` without Hydra: the class, called (or partial) with its options."""
    cls, options = checked_node(node, base, source, option)
    if plain(node).get("_partial_", False):
        return functools.partial(cls, **options)
    return cls(**options)
