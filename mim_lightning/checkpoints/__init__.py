"""The checkpoint room: atomic checkpoint files (``io``), official checkpoints (``official``), weight surgery
(``resize``), timm key maps and model names for export (``timm_keys``), and reading pretrained weights into a
finetuning classifier (``pretrained``)."""

from mim_lightning.checkpoints.official import convert_official, unwrap_state_dict
from mim_lightning.checkpoints.resize import expand_shared_rel_pos_bias, resize_pos_embed, resize_rel_pos_bias

__all__ = ["convert_official", "expand_shared_rel_pos_bias", "resize_pos_embed", "resize_rel_pos_bias",
           "unwrap_state_dict"]
