r"""lm-eval's command line with dfw's models: `lm_eval` with dfw imported first, and `--model dfw` registered.

    python -m dfw.eval.lm_eval_cli --model dfw \
        --model_args pretrained=<export | .ckpt | HF dir> --tasks lambada_openai

Every option is lm-eval's (`--tasks`, `--num_fewshot`, `--batch_size`, `--include_path`, `--output_path`,
...). `--model dfw` loads what `python -m dfw.eval model=` takes, with the model's own tokenizer, and
decodes a converted model with its RecurrentCache (dfw/eval/lm_eval_model.py). lm-eval alone finds no
model plugins, and without dfw transformers does not know the `dfw-gpt2` model type of an export.
"""

from __future__ import annotations

import sys

from ..errors import ConfigError
from .harness import INSTALL


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with dfw's models registered (`--model dfw`)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print(
            "error: python -m dfw.eval.lm_eval_cli needs lm-evaluation-harness, which is not installed: "
            f"{INSTALL}",
            file=sys.stderr,
        )
        sys.exit(2)
    import dfw  # noqa: F401  (registers the dfw-gpt2 model type with transformers)

    from . import lm_eval_model  # noqa: F401  (registers --model dfw)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ConfigError as err:  # `pretrained=` that dfw cannot load, ...
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
