"""Official-checkpoint converters on synthetic official-layout state dicts, and weight resizing."""

from __future__ import annotations

import pytest
import torch

from mim_lightning import ConfigError, build_pretrain_module, compose
from mim_lightning.checkpoints import convert_official, resize_pos_embed, resize_rel_pos_bias
from mim_lightning.models.mae import MaskedAutoencoder

VIT_TEST = {"name": "vit_test", "family": "vit", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "mlp_ratio": 2.0}


def official_mae_state(depth: int = 2, dim: int = 32, grid: int = 4, patch: int = 8, hidden: int = 64,
                       dec: int = 16, dec_hidden: int = 32, full: bool = True) -> dict[str, torch.Tensor]:
    """The key layout of ``mae:models_mae.py`` (timm 0.3.2 names), written out by hand."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    def block(prefix: str, d: int, h: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.norm1.weight": t(d), f"{prefix}.norm1.bias": t(d), f"{prefix}.attn.qkv.weight": t(3 * d, d),
                f"{prefix}.attn.qkv.bias": t(3 * d), f"{prefix}.attn.proj.weight": t(d, d), f"{prefix}.attn.proj.bias": t(d),
                f"{prefix}.norm2.weight": t(d), f"{prefix}.norm2.bias": t(d), f"{prefix}.mlp.fc1.weight": t(h, d),
                f"{prefix}.mlp.fc1.bias": t(h), f"{prefix}.mlp.fc2.weight": t(d, h), f"{prefix}.mlp.fc2.bias": t(d)}

    state = {"cls_token": t(1, 1, dim), "pos_embed": t(1, grid * grid + 1, dim),
             "patch_embed.proj.weight": t(dim, 3, patch, patch), "patch_embed.proj.bias": t(dim),
             "norm.weight": t(dim), "norm.bias": t(dim)}
    for i in range(depth):
        state.update(block(f"blocks.{i}", dim, hidden))
    if full:
        state.update({"mask_token": t(1, 1, dec), "decoder_embed.weight": t(dec, dim), "decoder_embed.bias": t(dec),
                      "decoder_pos_embed": t(1, grid * grid + 1, dec), "decoder_norm.weight": t(dec),
                      "decoder_norm.bias": t(dec), "decoder_pred.weight": t(patch * patch * 3, dec),
                      "decoder_pred.bias": t(patch * patch * 3)})
        state.update(block("decoder_blocks.0", dec, dec_hidden))
    return state


def test_official_mae_full_checkpoint_loads_strictly():
    model = MaskedAutoencoder(VIT_TEST, img_size=32, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    official = official_mae_state()
    converted = convert_official("mae", {"model": official})
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(model.encoder.blocks[1].attn.qkv.weight, official["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(model.decoder.decoder_pred.weight, official["decoder_pred.weight"])


def test_official_mae_encoder_file_loads_into_the_finetune_classifier(tmp_path, class_folder):
    from mim_lightning import build_finetune_module

    torch.save({"model": official_mae_state(full=False)}, tmp_path / "mae_pretrain_vit_test.pth")
    cfg = compose("finetune", ["backbone=vit_test", "backbone.depth=2", "data.image_size=32", "data.batch_size=4",
                               f"data.root={class_folder}", f"pretrained={tmp_path / 'mae_pretrain_vit_test.pth'}"])
    module = build_finetune_module(cfg)
    torch.testing.assert_close(module.model.blocks[0].mlp.fc1.weight, official_mae_state()["blocks.0.mlp.fc1.weight"])


def test_converter_rejects_a_checkpoint_of_another_method():
    with pytest.raises(ConfigError, match="unknown key for MAE"):
        convert_official("mae", {"encoder.layers.0.blocks.0.norm1.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match="allowed: .*mae"):
        convert_official("beit", {})


def project_state(method: str, backbone: str, *extra: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    cfg = compose("pretrain", [f"method={method}", f"backbone={backbone}", "data.image_size=64", "experiment=null", *extra])
    model = build_pretrain_module(cfg).model
    return model, {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
                   for k, v in model.state_dict().items()}


def strip(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def test_official_simmim_swin_checkpoint_loads_strictly():
    model, state = project_state("simmim", "swin_test")
    official = dict(state)  # SimMIM's own layout is encoder.* / decoder.0.*, plus index buffers it saves
    official["encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    assert "encoder.layers.0.downsample.reduction.weight" in official and "decoder.0.weight" in official
    model.load_state_dict(convert_official("simmim", {"model": official}), strict=True)
    torch.testing.assert_close(model.encoder.mask_token, state["encoder.mask_token"])


def test_official_mixmim_checkpoint_loads_strictly():
    model, state = project_state("mixmae", "swin_test")
    official = strip(state, ("encoder.", "decoder."))
    assert {"absolute_pos_embed", "mask_token", "decoder_pos_embed", "layers.0.blocks.0.attn.relative_position_index",
            "layers.0.downsample.reduction.weight"} <= set(official)
    model.load_state_dict(convert_official("mixmae", {"model": official}), strict=True)


def test_official_itpn_pixel_checkpoint_loads_strictly():
    model, state = project_state("itpn", "hivit_test")
    official = strip(state, ("encoder.", "pyramid.", "decoder."))
    official["blocks.0.attn.relative_position_index"] = torch.zeros(3, dtype=torch.long)  # dropped
    assert {"absolute_pos_embed", "align_dim_16tofpn.weight", "split_16to8.reduction.weight", "fpn_modules.0.mlp.fc1.weight",
            "decoder_embed.0.0.weight", "mask_token"} <= set(official)
    model.load_state_dict(convert_official("itpn", {"model": official}), strict=True)


def test_pos_embed_resize_keeps_cls_and_constant_grids():
    pos = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pos, (4, 4)) is pos
    out = resize_pos_embed(pos, (6, 6))
    assert out.shape == (1, 37, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    flat = torch.cat([pos[:, :1], torch.full((1, 16, 8), 0.5)], dim=1)
    torch.testing.assert_close(resize_pos_embed(flat, (7, 7))[:, 1:], torch.full((1, 49, 8), 0.5))


@pytest.mark.parametrize("mode", ["geometric", "bicubic"])
def test_rel_pos_bias_resize_6_to_7_keeps_the_centre(mode):
    table = torch.randn(11 * 11, 4)
    out = resize_rel_pos_bias(table, 7, old_window=6, mode=mode)
    assert out.shape == (13 * 13, 4)
    torch.testing.assert_close(out.view(13, 13, 4)[6, 6], table.view(11, 11, 4)[5, 5])
    assert resize_rel_pos_bias(table, 6) is table
    with pytest.raises(ConfigError):
        resize_rel_pos_bias(table, 7, old_window=5)
