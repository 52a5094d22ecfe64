"""dfw's Hydra configs (`conf/`), wherever dfw is installed.

The repository keeps `conf/` at its top. A wheel or sdist install carries it inside the package, as
`dfw/conf/` (package data mapped from `conf/` by pyproject.toml); a clone or an editable install uses
the repository's own `conf/`. Every entry point, benchmark and test finds the folder through
`config_dir()`, so `pip install dfw` can train from any working directory.

    from dfw import presets
    cfg = presets.compose("train", ["attention=decay", "debug=fast"])   # as `dfw-train` would see it
    node = presets.attention_preset("decay")                            # conf/attention/decay.yaml

A user's own configs compose on top: `dfw-train --config-dir=<folder>` (its files win over dfw's), or
`hydra.searchpath=[file://<folder>]` in a config or on the command line (docs/configs.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The folder of dfw's configs: `dfw/conf/` when installed from a wheel, else the repository's `conf/`."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"dfw's configs are missing: neither {_PACKAGE / 'conf'} (a wheel install) nor "
        f"{_PACKAGE.parent / 'conf'} (a clone) holds train.yaml; reinstall dfw"
    )


def names(group: str) -> list[str]:
    """The options of a config group, e.g. `names("attention")` -> ["decay", "delta", ...]."""
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """The config `config_name` (train, generate) with `overrides`, as its entry point composes it.

    Uses Hydra's compose API, so it cannot run inside a running Hydra app (`@hydra.main`).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from .config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def attention_preset(name: str) -> DictConfig:
    """`conf/attention/<name>.yaml`, the node that `attention=<name>` selects."""
    path = config_dir() / "attention" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no attention preset {name!r}; choose one of {', '.join(names('attention'))}")
    node = OmegaConf.load(path)
    assert isinstance(node, DictConfig), path
    return node
