"""Finetuning / linear-probing entry point: ``python -m mim_lightning.finetune [group=option ...] [key=value ...]``.

Composes ``conf/finetune.yaml``: ``method=`` names the pretraining method (its recipe is
``conf/finetune/<method>.yaml``), ``pretrained=`` the weights, ``mode=finetune|linear_probe``.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mim_lightning.api import finetune
from mim_lightning.cli import EXIT_CONFIG_ERROR, entry_point, fail, run_or_exit
from mim_lightning.config import CONF_DIR


def finetune_methods() -> list[str]:
    """Methods with a finetuning recipe (``conf/finetune/*.yaml``)."""
    from mim_lightning.config import group_options

    return group_options("finetune")


def check_method(argv: list[str]) -> None:
    """A ``method=`` without a finetuning recipe fails in one line (before Hydra's multi-line report)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "method" and value not in finetune_methods():
            fail(f"method={value!r}: no finetuning recipe conf/finetune/{value}.yaml; "
                 f"allowed: {', '.join(finetune_methods())}", EXIT_CONFIG_ERROR)


@hydra.main(config_path=str(CONF_DIR), config_name="finetune", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    run_or_exit(finetune, cfg)


def main() -> None:
    if not any(a in ("--help", "-h") for a in sys.argv[1:]):
        check_method(sys.argv[1:])
    entry_point("finetune", _hydra_main, finetune)


if __name__ == "__main__":
    main()
