"""Official-checkpoint converters on synthetic official-layout state dicts, and weight resizing."""

from __future__ import annotations

import pytest
import torch

from mim_lightning import ConfigError, build_pretrain_module, compose
from mim_lightning.checkpoints import convert_official, resize_pos_embed, resize_rel_pos_bias
from mim_lightning.methods.mae.model import MaskedAutoencoder

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


def test_official_simmim_vit_checkpoint_loads_strictly_and_into_the_finetune_classifier(tmp_path, class_folder):
    from mim_lightning import build_finetune_module

    model, state = project_state("simmim", "vit_test", "mask.unit=16")
    # VisionTransformerForSimMIM's layout: encoder.cls_token / mask_token / rel_pos_bias / blocks (q_bias, v_bias,
    # gamma_1, gamma_2), encoder.norm, decoder.0, plus the index buffer it saves
    official = dict(state)
    official["encoder.rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    assert {"encoder.cls_token", "encoder.mask_token", "encoder.rel_pos_bias.relative_position_bias_table",
            "encoder.blocks.0.attn.q_bias", "encoder.blocks.0.gamma_1", "decoder.0.weight"} <= set(official)
    converted = convert_official("simmim", {"model": official})
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(model.encoder.rel_pos_bias.relative_position_bias_table,
                               official["encoder.rel_pos_bias.relative_position_bias_table"])
    torch.save({"model": official}, tmp_path / "simmim_vit.pth")
    cfg = compose("finetune", ["method=simmim", "backbone=vit_test", "data.image_size=64", "data.batch_size=4",
                               f"data.root={class_folder}", f"pretrained={tmp_path / 'simmim_vit.pth'}"])
    classifier = build_finetune_module(cfg).model
    torch.testing.assert_close(classifier.blocks[0].attn.relative_position_bias_table,
                               official["encoder.rel_pos_bias.relative_position_bias_table"])
    torch.testing.assert_close(classifier.blocks[0].gamma_2, official["encoder.blocks.0.gamma_2"])


def test_simmim_converter_tells_the_layouts_apart_and_rejects_other_vit_configs():
    from mim_lightning.methods.simmim.spec import simmim_layout

    _, vit = project_state("simmim", "vit_test", "mask.unit=16")
    _, swin = project_state("simmim", "swin_test")
    assert simmim_layout(vit) == "vit" and simmim_layout(swin) == "swin"
    with pytest.raises(ConfigError, match="neither layout"):
        convert_official("simmim", {"encoder.norm.weight": torch.zeros(2), "decoder.0.weight": torch.zeros(2)})
    with_ape = {**vit, "encoder.pos_embed": torch.zeros(1, 17, 32)}  # USE_APE=True: not the pretraining config
    with pytest.raises(ConfigError, match="encoder.pos_embed"):
        convert_official("simmim", with_ape)
    per_block = {k: v for k, v in vit.items() if not k.startswith("encoder.rel_pos_bias.")}  # USE_RPB=True
    per_block["encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(52, 2)
    with pytest.raises(ConfigError, match="USE_SHARED_RPB"):
        convert_official("simmim", per_block)


def test_beit_style_tables_resize_with_their_three_cls_rows_kept():
    table = torch.randn(7 * 7 + 3, 2)  # grid 4x4
    out = resize_rel_pos_bias(table, 6, num_extra_tokens=3)
    assert out.shape == (11 * 11 + 3, 2)
    torch.testing.assert_close(out[-3:], table[-3:])
    torch.testing.assert_close(out[:-3].view(11, 11, 2)[5, 5], table[:-3].view(7, 7, 2)[3, 3])
    assert resize_rel_pos_bias(table, 4, num_extra_tokens=3) is table
    rect = resize_rel_pos_bias(table, (4, 6), num_extra_tokens=3)  # to a 4x6 grid: only the width resampled
    assert rect.shape == (7 * 11 + 3, 2)
    torch.testing.assert_close(rect[:-3].view(7, 11, 2)[:, 5], table[:-3].view(7, 7, 2)[:, 3])


def test_shared_table_expands_to_every_block_once():
    from mim_lightning.checkpoints import expand_shared_rel_pos_bias

    shared = torch.randn(52, 2)
    out = expand_shared_rel_pos_bias({"rel_pos_bias.relative_position_bias_table": shared, "cls_token": shared},
                                     depth=3)
    assert "rel_pos_bias.relative_position_bias_table" not in out and "cls_token" in out
    for i in range(3):
        torch.testing.assert_close(out[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    out["blocks.0.attn.relative_position_bias_table"].add_(1)  # copies, not views of one tensor
    torch.testing.assert_close(out["blocks.1.attn.relative_position_bias_table"], shared)
    per_block = {"blocks.0.attn.relative_position_bias_table": shared}  # already expanded: unchanged (SimMIM#19)
    assert expand_shared_rel_pos_bias(per_block, depth=1) == per_block


def test_official_itpn_clip_checkpoint_loads_strictly_and_into_the_finetune_classifier(tmp_path, class_folder):
    import warnings

    from mim_lightning import build_finetune_module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random test teacher
        model, state = project_state("itpn_clip", "hivit_test")
    official = strip(state, ("encoder.", "pyramid."))  # iTPNClipDistill: everything at the top level
    official["relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)  # dropped
    assert {"absolute_pos_embed", "blocks.4.gamma_1", "blocks.4.attn.relative_position_bias_table",
            "split_16to8.norm.weight", "lm_head.weight", "lm_cls_head.weight", "cls_pt_layers.0.gamma_2",
            "norm_cls.weight", "mask_token"} <= set(official)
    model.load_state_dict(convert_official("itpn_clip", {"model": official}), strict=True)
    torch.save({"model": official}, tmp_path / "itpn_clip.pth")
    cfg = compose("finetune", ["method=itpn_clip", "backbone=hivit_test", "data.image_size=64", "data.batch_size=4",
                               f"data.root={class_folder}", f"pretrained={tmp_path / 'itpn_clip.pth'}"])
    encoder = build_finetune_module(cfg).model.encoder
    torch.testing.assert_close(encoder.blocks[4].gamma_1, official["blocks.4.gamma_1"])
    torch.testing.assert_close(encoder.blocks[4].attn.relative_position_bias_table,
                               official["blocks.4.attn.relative_position_bias_table"])


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "torch-runtimeerror"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_old_one(tmp_path, capsys, monkeypatch, wrapped):
    import errno

    from mim_lightning.checkpoints.io import AtomicCheckpointIO
    from mim_lightning.cli import run_or_exit

    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
    real_save = torch.save

    def full(obj, stream, *args, **kwargs):
        stream.write(b"x" * 64)
        error = OSError(errno.ENOSPC, "No space left on device")
        if not wrapped:
            raise error
        try:
            raise error
        except OSError:  # what torch's zip writer makes of it
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0") from None

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as info:
        run_or_exit(AtomicCheckpointIO().save_checkpoint, {"state_dict": {"w": torch.zeros(2)}}, target)
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 1, err
    assert err[0].startswith(f"mim_lightning: error: cannot write checkpoint {target}: the disk is full"), err[0]
    assert torch.equal(torch.load(target, weights_only=False)["state_dict"]["w"], torch.ones(2))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
