"""Export: encoder -> safetensors -> timm.create_model(..., checkpoint_path=...) gives the same features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from mim_lightning import ConfigError
from mim_lightning.export import export
from mim_lightning.methods.mae.model import MaskedAutoencoder
from mim_lightning.methods.simmim.model import SimMIM

from conftest import REPO

VIT_TEST = {"name": "vit_test", "family": "vit", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "mlp_ratio": 2.0}
SWIN_TEST = {"name": "swin_test", "family": "swin", "patch_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1],
             "num_heads": [1, 2, 4, 8], "mlp_ratio": 2.0, "simmim_window_size": 6}


def fake_lightning_checkpoint(path: Path, model: torch.nn.Module, target: str, backbone: dict, image_size: int,
                              model_cfg: dict | None = None) -> Path:
    """A checkpoint shaped like the pretraining runs' (state_dict under ``model.``, resolved config)."""
    config = {"backbone": backbone, "data": {"image_size": image_size},
              "method": {"model": {"_target_": target, **(model_cfg or {})}}}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": config}}, path)
    return path


def timm_from_file(path: Path) -> torch.nn.Module:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    kwargs = json.loads(meta["timm_kwargs"])
    return timm.create_model(meta["timm_model"], pretrained=False, num_classes=0, checkpoint_path=str(path), **kwargs).eval()


def test_mae_vit_encoder_exports_to_timm_with_the_same_features(tmp_path):
    model = MaskedAutoencoder(VIT_TEST, img_size=32, decoder_dim=16, decoder_depth=1, decoder_heads=2).eval()
    ckpt = fake_lightning_checkpoint(tmp_path / "mae.ckpt", model, "mim_lightning.methods.mae.model.MaskedAutoencoder",
                                     VIT_TEST, 32)
    out = tmp_path / "encoder.safetensors"
    meta = export(ckpt, out)
    assert meta["timm_model"] == "vit_base_patch16_224" and meta["family"] == "vit"
    timm_model = timm_from_file(out)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(images), model.encoder(images), atol=1e-5, rtol=1e-5)


def test_simmim_swin_encoder_exports_to_timm_with_the_same_features(tmp_path):
    model = SimMIM(SWIN_TEST, img_size=64, mask_unit=16).eval()
    ckpt = fake_lightning_checkpoint(tmp_path / "simmim.ckpt", model, "mim_lightning.methods.simmim.model.SimMIM",
                                     SWIN_TEST, 64, {"window_size": None})
    out = tmp_path / "swin.safetensors"
    meta = export(ckpt, out)
    assert meta["timm_model"].startswith("swin_")
    timm_model = timm_from_file(out)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.encoder.forward_tokens(images)  # (B, h, w, C) after the final norm
        torch.testing.assert_close(timm_model.forward_features(images), expected, atol=1e-5, rtol=1e-5)


def test_export_cli_and_bad_input(tmp_path):
    model = MaskedAutoencoder(VIT_TEST, img_size=32, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    ckpt = fake_lightning_checkpoint(tmp_path / "mae.ckpt", model, "mim_lightning.methods.mae.model.MaskedAutoencoder",
                                     VIT_TEST, 32)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "mim_lightning.export", f"ckpt={ckpt}",
                             f"out={tmp_path / 'e.safetensors'}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "timm.create_model('vit_base_patch16_224'" in result.stdout and (tmp_path / "e.safetensors").exists()
    missing = subprocess.run([sys.executable, "-m", "mim_lightning.export", f"ckpt={tmp_path / 'nope.ckpt'}",
                              f"out={tmp_path / 'x.safetensors'}"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "no such file" in missing.stderr
    with pytest.raises(ConfigError, match="safetensors"):
        export(ckpt, tmp_path / "encoder.pt")


@pytest.mark.parametrize("method", ["mixmae", "itpn"])
def test_mixmim_and_hivit_encoders_export_in_the_documented_format(method, tmp_path):
    from omegaconf import OmegaConf

    from mim_lightning import build_pretrain_module, compose
    from mim_lightning.export import load_exported

    backbone = "swin_test" if method == "mixmae" else "hivit_test"
    cfg = compose("pretrain", [f"method={method}", f"backbone={backbone}", "data.image_size=64", "experiment=null"])
    model = build_pretrain_module(cfg).model.eval()
    ckpt = fake_lightning_checkpoint(tmp_path / "m.ckpt", model, cfg.method.model._target_,
                                     OmegaConf.to_container(cfg.backbone), 64,
                                     {k: v for k, v in OmegaConf.to_container(cfg.method.model, resolve=True).items()
                                      if k == "window_size"})
    meta = export(ckpt, tmp_path / "enc.safetensors")
    assert meta["format"] == "mim_lightning"
    encoder = load_exported(tmp_path / "enc.safetensors").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), model.encoder(images))


def test_an_exported_swin_encoder_is_a_valid_pretrained_file_for_finetuning(tmp_path):
    from mim_lightning.checkpoints.pretrained import read_pretrained
    from mim_lightning.methods import spec_named

    model = SimMIM(SWIN_TEST, img_size=64, mask_unit=16)
    ckpt = fake_lightning_checkpoint(tmp_path / "simmim.ckpt", model, "mim_lightning.methods.simmim.model.SimMIM",
                                     SWIN_TEST, 64, {"window_size": None})
    export(ckpt, tmp_path / "swin.safetensors")
    state = read_pretrained(tmp_path / "swin.safetensors", spec_named("simmim"))
    expected = {k: v for k, v in model.encoder.state_dict().items() if k != "mask_token"}
    assert set(state) == set(expected)  # back in the official layout (layers.{i}.downsample)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value)


def test_simmim_vit_encoder_exports_to_timm_beit_with_the_same_features(tmp_path):
    from mim_lightning.checkpoints.pretrained import read_pretrained
    from mim_lightning.methods import spec_named

    model = SimMIM(VIT_TEST, img_size=32, mask_unit=16).eval()
    with torch.no_grad():
        model.encoder.rel_pos_bias.relative_position_bias_table.normal_()  # zeros at init
    ckpt = fake_lightning_checkpoint(tmp_path / "simmim_vit.ckpt", model, "mim_lightning.methods.simmim.model.SimMIM",
                                     VIT_TEST, 32)
    out = tmp_path / "beit.safetensors"
    meta = export(ckpt, out)
    assert meta["timm_model"] == "beit_base_patch16_224" and json.loads(meta["timm_kwargs"])["use_shared_rel_pos_bias"]
    timm_model = timm_from_file(out)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # (B, 1 + L, D) final-norm tokens, cls first
        torch.testing.assert_close(timm_model.forward_features(images), model.encoder.forward_tokens(images),
                                   atol=1e-5, rtol=1e-5)
    state = read_pretrained(out, spec_named("simmim"))  # and the file is a valid pretrained= for finetuning
    expected = {k: v for k, v in model.encoder.state_dict().items() if k != "mask_token"}
    assert set(state) == set(expected)


def test_finetuned_simmim_vit_exports_the_classifier_without_its_head(tmp_path, class_folder):
    from mim_lightning import build_finetune_module, compose

    base = ["method=simmim", "backbone=vit_test", "backbone.depth=2", "data.image_size=32", f"data.root={class_folder}"]
    module = build_finetune_module(compose("finetune", base)).eval()
    ckpt = tmp_path / "ft.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": module.hparams.config}}, ckpt)
    meta = export(ckpt, tmp_path / "ft.safetensors")
    kwargs = json.loads(meta["timm_kwargs"])
    assert meta["timm_model"].startswith("beit_") and kwargs["use_rel_pos_bias"] and kwargs["global_pool"] == "avg"
    timm_model = timm_from_file(tmp_path / "ft.safetensors")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(images), module.model.forward_head(module.model.forward_features(images),
                                                                                 pre_logits=True))
    probe = build_finetune_module(compose("finetune", [*base, "mode=linear_probe", "finetune.linear_probe.block=1"]))
    torch.save({"state_dict": probe.state_dict(), "hyper_parameters": {"config": probe.hparams.config}}, ckpt)
    with pytest.raises(ConfigError, match="linear-probe"):
        export(ckpt, tmp_path / "probe.safetensors")


def test_itpn_clip_encoder_exports_in_the_documented_format_with_layer_scale(tmp_path):
    import warnings

    from omegaconf import OmegaConf

    from mim_lightning import build_pretrain_module, compose
    from mim_lightning.export import load_exported

    cfg = compose("pretrain", ["method=itpn_clip", "backbone=hivit_test", "data.image_size=64", "experiment=null"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random test teacher
        model = build_pretrain_module(cfg).model.eval()
    with torch.no_grad():
        for name, param in model.encoder.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_()
    model_cfg = OmegaConf.to_container(cfg.method.model, resolve=True)
    ckpt = fake_lightning_checkpoint(tmp_path / "clip.ckpt", model, cfg.method.model._target_,
                                     OmegaConf.to_container(cfg.backbone), 64,
                                     {k: model_cfg[k] for k in ("rpe", "layer_scale_init")})
    meta = export(ckpt, tmp_path / "clip.safetensors")
    assert meta["format"] == "mim_lightning" and json.loads(meta["builder_kwargs"]) == {"rpe": True,
                                                                                        "layer_scale_init": 0.1}
    encoder = load_exported(tmp_path / "clip.safetensors").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), model.encoder(images))
