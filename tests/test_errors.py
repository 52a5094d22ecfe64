"""dfw.errors: the one place that unwraps Hydra's exceptions, and the one-line exit of entry points."""

from __future__ import annotations

import logging

import pytest
from hydra.errors import InstantiationException

from dfw.errors import ConfigError, instantiate, run_or_exit


def refuse(value: int) -> int:
    if value < 0:
        raise ConfigError(f"value must be non-negative, got {value}")
    return value


def fail(value: int) -> int:
    raise RuntimeError("a bug, not bad input")


TARGET = f"{__name__}.refuse"


def test_instantiate_raises_the_config_error_that_hydra_wraps():
    with pytest.raises(InstantiationException):  # what Hydra alone raises
        __import__("hydra.utils").utils.instantiate({"_target_": TARGET, "value": -1})
    with pytest.raises(ConfigError, match=r"^value must be non-negative, got -1$") as error:
        instantiate({"_target_": TARGET, "value": -1})
    assert error.value.__cause__ is None and error.value.__suppress_context__
    nested = {"_target_": "builtins.dict", "inner": {"_target_": TARGET, "value": -2}}
    with pytest.raises(ConfigError, match="got -2"):
        instantiate(nested)
    assert instantiate({"_target_": TARGET, "value": 3}) == 3
    assert instantiate({"_target_": TARGET, "_partial_": True})(value=4) == 4


def test_instantiate_turns_lightnings_misconfiguration_into_one_line():
    trainer = {"_target_": "lightning.pytorch.Trainer", "max_steps": -5, "logger": False}
    with pytest.raises(
        ConfigError, match=r"^lightning\.pytorch\.Trainer: `max_steps` must be a non-negative integer"
    ) as error:
        instantiate(trainer)
    assert "\n" not in str(error.value)


def test_instantiate_leaves_other_errors_as_they_are():
    with pytest.raises(InstantiationException, match="a bug, not bad input"):
        instantiate({"_target_": f"{__name__}.fail", "value": 1})


def test_run_or_exit_prints_one_line_and_exits_2(caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        run_or_exit(instantiate, {"_target_": TARGET, "value": -1}, logger=logging.getLogger("test"))
    assert exit_.value.code == 2
    assert [r.getMessage() for r in caplog.records] == ["error: value must be non-negative, got -1"]
    with pytest.raises(RuntimeError):
        run_or_exit(fail, 1, logger=logging.getLogger("test"))
