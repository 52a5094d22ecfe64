"""`python -m dfw.eval model=<export | .ckpt | Hugging Face dir or hub id> tasks=[ppl,copy,recall] ...`"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import dfw  # noqa: F401  (registers the config resolvers and the dfw-gpt2 model type)
from dfw.errors import run_or_exit
from dfw.eval import evaluate
from dfw.presets import config_dir

log = logging.getLogger("dfw.eval")
CONF = config_dir()

# `model` is a config group in conf/ (for training), so Hydra would read `model=<path>` as a group choice.
# Served from the ConfigStore, whose search path has only the groups dfw.eval uses (eval/, data/),
# conf/eval.yaml takes `model=<anything>` as a value (as dfw.generate does).
store = ConfigStore.instance()
store.store(name="eval", node=OmegaConf.load(CONF / "eval.yaml"))
store.store(group="eval", name="tasks", node=OmegaConf.load(CONF / "eval" / "tasks.yaml"))
for _file in sorted((CONF / "data").glob("*.yaml")):
    store.store(group="data", name=_file.stem, node=OmegaConf.load(_file))


@hydra.main(version_base="1.3", config_path=None, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        run_or_exit(evaluate, cfg, logger=log)
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's code for a run ended by Ctrl-C; results.csv keeps the finished tasks


if __name__ == "__main__":
    main()
