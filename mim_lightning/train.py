"""Pretraining entry point: ``python -m mim_lightning.train [group=option ...] [key=value ...]``.

Composes ``conf/pretrain.yaml``; ``-m`` sweeps (``-m mask.ratio=0.6,0.75,0.9``) run one job per point.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mim_lightning.api import pretrain
from mim_lightning.cli import check_argv, run_or_exit
from mim_lightning.config import CONF_DIR, normalize_overrides


@hydra.main(config_path=str(CONF_DIR), config_name="pretrain", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    run_or_exit(pretrain, cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
    check_argv(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
