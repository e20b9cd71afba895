"""Pretraining entry point: ``python -m mim_lightning.train [group=option ...] [key=value ...]``.

Composes ``conf/pretrain.yaml``; ``-m`` sweeps (``-m mask.ratio=0.6,0.75,0.9``) run one job per point.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mim_lightning.api import pretrain
from mim_lightning.cli import entry_point, run_or_exit
from mim_lightning.config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="pretrain", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    run_or_exit(pretrain, cfg)


def main() -> None:
    entry_point("pretrain", _hydra_main, pretrain)


if __name__ == "__main__":
    main()
