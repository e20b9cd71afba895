"""Finetuning and linear probing: layer-decay map, data, pretrain -> finetune round trip, probes, bad input."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mim_lightning import ConfigError, build_finetune_datamodule, build_finetune_module, compose, finetune
from mim_lightning.models.classifiers.vit import ViTBuilder, vit_layer_id
from mim_lightning.optim import layer_decay_param_groups

from conftest import REPO, write_images

CLI_TIMEOUT = 300
TINY = ["backbone=vit_test", "data.image_size=32", "data.batch_size=4", "data.num_workers=0", "data.val_fraction=0.2",
        "trainer=cpu", "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "trainer.log_every_n_steps=1"]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled") / "classes"
    for label, name in enumerate(["cat", "dog", "emu"]):
        write_images(root / name, 6, seed=10 + label, prefix=name)
    return root


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory, labelled) -> Path:
    """A 2-step MAE pretraining run of vit_test at 32px, through the pretraining CLI."""
    run_dir = tmp_path_factory.mktemp("pretrain")
    result = run_module("mim_lightning.train", "method=mae", "data=imagefolder", f"data.root={labelled}",
                        "trainer.max_steps=2", f"run_dir={run_dir}", *[a for a in TINY if "val_fraction" not in a])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


def ft_cfg(labelled: Path, run_dir: Path, *extra: str):
    return compose("finetune", [*TINY, f"data.root={labelled}", f"run_dir={run_dir}", *extra])


# --------------------------------------------------------------------------- layer-wise lr decay


def test_vit_layer_ids_match_maes_table():
    table = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 1,
             "blocks.1.norm1.bias": 2, "blocks.11.mlp.fc2.weight": 12, "fc_norm.weight": 13, "norm.weight": 13,
             "head.weight": 13, "head.bias": 13}
    assert {name: vit_layer_id(name, num_layers=13) for name in table} == table


def test_layer_decay_groups_give_maes_scales_and_no_decay_lists():
    backbone = {"family": "vit", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    clf = ViTBuilder(backbone, 32).build(5)
    groups = layer_decay_param_groups(clf.model, 0.05, 0.5, clf.layer_id, clf.num_layers, clf.no_weight_decay)
    scale_of = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    decay_of = {name: g["weight_decay"] for g in groups for name in g["param_names"]}
    # num_layers = depth + 1 = 3: scale = 0.5 ** (3 - layer_id)
    assert scale_of["cls_token"] == scale_of["pos_embed"] == scale_of["patch_embed.proj.weight"] == 0.125
    assert scale_of["blocks.0.attn.qkv.weight"] == 0.25
    assert scale_of["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale_of["head.weight"] == scale_of["fc_norm.weight"] == 1.0
    assert decay_of["cls_token"] == decay_of["pos_embed"] == decay_of["blocks.0.attn.qkv.bias"] == 0.0
    assert decay_of["blocks.0.attn.qkv.weight"] == decay_of["head.weight"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(clf.model.parameters()))


def test_mae_classifier_is_global_pool_with_fc_norm_and_tiny_head():
    backbone = {"family": "vit", "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    clf = ViTBuilder(backbone, 32, head_init_std=2e-5).build(3)
    model = clf.model
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.LayerNorm)
    assert model.fc_norm.eps == 1e-6 and model.global_pool == "avg"
    assert model.head.weight.std() < 1e-4 and torch.all(model.head.bias == 0)
    images = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(images)
    expected = model.head(model.fc_norm(tokens[:, 1:].mean(dim=1)))  # mean of patch tokens, cls excluded
    torch.testing.assert_close(model(images), expected)


def test_linear_probe_head_is_batchnorm_without_affine_then_linear():
    backbone = {"family": "vit", "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    clf = ViTBuilder(backbone, 32, pool="token").build(3, {"feature": "cls", "head_init_std": 0.01})
    bn, linear = clf.model.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert isinstance(linear, torch.nn.Linear) and clf.model.global_pool == "token"


# --------------------------------------------------------------------------- data


def test_classification_data_has_labels_and_deterministic_eval(labelled, tmp_path):
    cfg = ft_cfg(labelled, tmp_path)
    dm = build_finetune_datamodule(cfg)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog", "emu"]
    item = dm.train_dataset[(0, 0)]
    assert item["images"].shape == (3, 32, 32) and item["label"] in (0, 1, 2)
    again = dm.train_dataset[(0, 0)]
    torch.testing.assert_close(item["images"], again["images"])  # RandAugment + erasing seeded per sample
    val = dm.val_dataset[(0, 0)]["images"]
    torch.testing.assert_close(val, dm.val_dataset[(0, 3)]["images"])  # eval: no randomness


def test_eval_transform_resizes_by_crop_pct():
    from mim_lightning.data.classification import eval_crop_size

    assert eval_crop_size(224, None) == 256
    assert eval_crop_size(384, None) == 384
    assert eval_crop_size(32, 0.5) == 64


def test_unlabelled_data_is_a_one_line_error(tmp_path):
    flat = tmp_path / "flat"
    write_images(flat, 4)
    with pytest.raises(ConfigError, match="class sub-folders"):
        build_finetune_module(compose("finetune", [*TINY, f"data.root={flat}"]))
    with pytest.raises(ConfigError, match="labelled source"):
        build_finetune_datamodule(compose("finetune", [*TINY, "data=demo"]))


# --------------------------------------------------------------------------- pretrained weights


def test_pretrained_encoder_loads_with_one_key(labelled, pretrained_ckpt, tmp_path):
    module = build_finetune_module(ft_cfg(labelled, tmp_path, f"pretrained={pretrained_ckpt}"))
    state = torch.load(pretrained_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model = module.model.state_dict()
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias"):
        torch.testing.assert_close(model[key], state["model.encoder." + key])
    assert module.model.pos_embed.requires_grad  # learnable in finetuning (frozen sin-cos in pretraining)


def test_pos_embed_is_resized_for_another_image_size(labelled, pretrained_ckpt, tmp_path):
    module = build_finetune_module(ft_cfg(labelled, tmp_path, f"pretrained={pretrained_ckpt}", "data.image_size=48"))
    state = torch.load(pretrained_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert module.model.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(module.model.pos_embed[:, 0], state["model.encoder.pos_embed"][:, 0])


def test_bad_pretrained_inputs_are_one_line_errors(labelled, pretrained_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        build_finetune_module(ft_cfg(labelled, tmp_path, f"pretrained={tmp_path / 'missing.ckpt'}"))
    with pytest.raises(ConfigError, match="another size"):
        build_finetune_module(ft_cfg(labelled, tmp_path, f"pretrained={pretrained_ckpt}", "backbone=vit_micro"))
    other = torch.load(pretrained_ckpt, map_location="cpu", weights_only=False)
    other["hyper_parameters"]["config"]["method"]["model"]["_target_"] = "mim_lightning.methods.simmim.model.SimMIM"
    other["mim_lightning"]["method"] = "simmim"
    torch.save(other, tmp_path / "simmim.ckpt")
    with pytest.raises(ConfigError, match="pretrained with another method|holds a simmim model") as info:
        build_finetune_module(ft_cfg(labelled, tmp_path, "method=mae", f"pretrained={tmp_path / 'simmim.ckpt'}"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="data.image_size"):
        build_finetune_module(ft_cfg(labelled, tmp_path, f"pretrained={pretrained_ckpt}", "data.image_size=36"))


def test_odd_batch_with_mixup_is_rejected(labelled, tmp_path):
    with pytest.raises(ConfigError, match="even"):
        build_finetune_module(ft_cfg(labelled, tmp_path, "data.batch_size=3"))


# --------------------------------------------------------------------------- runs


def test_pretrain_then_finetune_through_the_cli(labelled, pretrained_ckpt, tmp_path):
    run_dir = tmp_path / "ft"
    result = run_module("mim_lightning.finetune", "method=mae", *TINY, f"data.root={labelled}",
                        f"pretrained={pretrained_ckpt}", "trainer.max_epochs=2", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir)
    top1 = [float(r["finetune/val_top1"]) for r in rows if r.get("finetune/val_top1")]
    losses = [float(r["finetune/train_loss"]) for r in rows if r.get("finetune/train_loss")]
    assert len(top1) == 2 and all(0.0 <= v <= 1.0 for v in top1)
    assert losses and all(np.isfinite(losses))
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "config.yaml").exists()
    # the finetuned encoder exports to timm (global pool + fc_norm) and gives the classifier's features
    import json

    import timm

    from mim_lightning.export import export

    out = tmp_path / "ft.safetensors"
    meta = export(run_dir / "checkpoints" / "last.ckpt", out)
    kwargs = json.loads(meta["timm_kwargs"])
    assert kwargs["global_pool"] == "avg"
    timm_model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0, checkpoint_path=str(out),
                                   **kwargs).eval()
    module = build_finetune_module(ft_cfg(labelled, tmp_path))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model = module.model.eval()
        torch.testing.assert_close(timm_model(images), model.forward_head(model.forward_features(images), pre_logits=True))


def test_cli_rejects_a_method_without_recipe_in_one_line(tmp_path):
    result = run_module("mim_lightning.finetune", "method=nope", f"run_dir={tmp_path}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "method" in lines[0], result.stderr


def test_linear_probe_leaves_the_encoder_unchanged(labelled, pretrained_ckpt, tmp_path):
    cfg = ft_cfg(labelled, tmp_path, f"pretrained={pretrained_ckpt}", "mode=linear_probe", "trainer.max_steps=3",
                 "finetune.linear_probe.lr.warmup_epochs=0")
    trainer = finetune(cfg)
    model = trainer.lightning_module.model
    state = torch.load(pretrained_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            continue
        torch.testing.assert_close(value, state["model.encoder." + key], msg=key)
    assert all(p.requires_grad == n.startswith("head.") for n, p in model.named_parameters())
    from timm.optim import Lars

    assert isinstance(trainer.optimizers[0], Lars)
    import lightning.pytorch as pl

    pl.seed_everything(int(cfg.seed), verbose=False)  # the same init as finetune() draws
    build_finetune_datamodule(cfg).setup("fit")
    fresh = build_finetune_module(cfg)
    assert not torch.equal(fresh.model.head[1].weight, model.head[1].weight)  # the head did train


# --------------------------------------------------------------------------- Swin families (SimMIM, MixMAE)

SWIN_TEST = {"name": "swin_test", "family": "swin", "patch_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1],
             "num_heads": [1, 2, 4, 8], "mlp_ratio": 2.0, "simmim_window_size": 6}


def test_swin_layer_ids_match_simmims_table():
    from mim_lightning.models.classifiers.swin import swin_layer_id

    depths = [2, 2, 6, 2]  # Swin-T/B shape: sum 12, num_layers = 14 in SimMIM, scale = d ** (13 - id)
    table = {"patch_embed.proj.weight": 0, "absolute_pos_embed": 0, "mask_token": 0,
             "layers.0.blocks.0.attn.qkv.weight": 1, "layers.0.blocks.1.norm1.weight": 2,
             "layers.1.downsample.reduction.weight": 2,  # official layers.0.downsample: sum(depths[:1]) = 2
             "layers.1.blocks.0.mlp.fc1.weight": 3, "layers.2.downsample.norm.weight": 4,
             "layers.2.blocks.5.attn.proj.bias": 10, "layers.3.downsample.reduction.weight": 10,
             "layers.3.blocks.1.norm2.bias": 12, "norm.weight": 13, "head.fc.weight": 13}
    assert {name: swin_layer_id(name, depths) for name in table} == table


def test_mixmim_layer_ids_match_the_official_table_with_the_head_at_decay_1():
    from mim_lightning.models.classifiers.mixmim import MixMIMBuilder, mixmim_layer_id

    depths = [2, 2, 18, 2]  # MixMIM-B: total_layers 25, scale = d ** (25 - id)
    table = {"encoder.patch_embed.proj.weight": 0, "encoder.absolute_pos_embed": 0,
             "encoder.layers.0.blocks.1.attn.qkv.weight": 2, "encoder.layers.0.downsample.reduction.weight": 3,
             "encoder.layers.2.blocks.17.mlp.fc2.bias": 22, "encoder.layers.2.downsample.norm.weight": 23,
             "encoder.layers.3.blocks.1.norm1.weight": 24, "encoder.norm.weight": 24, "head.weight": 24}
    assert {name: mixmim_layer_id(name, depths) for name in table} == table
    clf = MixMIMBuilder(SWIN_TEST, 64).build(3)
    groups = layer_decay_param_groups(clf.model, 0.05, 0.7, clf.layer_id, clf.num_layers)
    scale_of = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    assert scale_of["head.weight"] == pytest.approx(0.7)  # decay ** 1, not 1 as MAE
    assert scale_of["encoder.layers.0.blocks.0.attn.qkv.weight"] == pytest.approx(0.7 ** 4)


def fake_checkpoint(path: Path, model: torch.nn.Module, target: str, image_size: int) -> Path:
    config = {"backbone": SWIN_TEST, "data": {"image_size": image_size}, "method": {"model": {"_target_": target}}}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": config}}, path)
    return path


def test_simmim_swin_finetunes_at_a_larger_window_with_the_rpb_centre_kept(labelled, tmp_path):
    from mim_lightning.methods.simmim.model import SimMIM

    pre = SimMIM(SWIN_TEST, img_size=64, mask_unit=16)  # window 2 (6 at 192px, scaled)
    ckpt = fake_checkpoint(tmp_path / "simmim.ckpt", pre, "mim_lightning.methods.simmim.model.SimMIM", 64)
    cfg = ft_cfg(labelled, tmp_path, "method=simmim", "backbone=swin_test", "data.image_size=96",
                 "finetune.classifier.window_size=3", f"pretrained={ckpt}", "trainer.fast_dev_run=1")
    module = build_finetune_module(cfg)
    new = module.model.layers[0].blocks[0].attn.relative_position_bias_table  # (2*3-1)^2 rows
    old = pre.encoder.layers[0].blocks[0].attn.relative_position_bias_table  # (2*2-1)^2 rows
    assert new.shape == (25, 1) and old.shape == (9, 1)
    torch.testing.assert_close(new.view(5, 5)[2, 2], old.view(3, 3)[1, 1])
    # timm's layers.1.downsample is the official layers.0.downsample
    torch.testing.assert_close(module.model.layers[1].downsample.reduction.weight,
                               pre.encoder.layers[0].downsample.reduction.weight)
    decay_of = {n: g["weight_decay"] for g in module.param_groups(1.0) for n in g["param_names"]}
    assert decay_of["layers.0.blocks.0.attn.relative_position_bias_table"] == 0.0  # SimMIM's skip list
    assert decay_of["layers.0.blocks.0.attn.qkv.weight"] == 0.05
    trainer = finetune(cfg)
    assert trainer.state.finished


def test_mixmae_classifier_has_the_pretrained_features(labelled, tmp_path):
    from mim_lightning.methods.mixmae.model import MixMAE

    pre = MixMAE(SWIN_TEST, img_size=64, decoder_dim=16, decoder_depth=1, decoder_heads=2).eval()
    ckpt = fake_checkpoint(tmp_path / "mixmae.ckpt", pre, "mim_lightning.methods.mixmae.model.MixMAE", 64)
    module = build_finetune_module(ft_cfg(labelled, tmp_path, "method=mixmae", "backbone=swin_test",
                                          "data.image_size=64", f"pretrained={ckpt}"))
    images = torch.randn(2, 3, 64, 64)
    model = module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(images), pre.encoder(images))  # no mixing, same weights
        torch.testing.assert_close(model(images), model.head(pre.encoder(images).mean(dim=1)))
    with pytest.raises(ConfigError, match="method='simmim': the checkpoint was pretrained with another method"):
        build_finetune_module(ft_cfg(labelled, tmp_path, "method=simmim", "backbone=swin_test", "data.image_size=64",
                                     f"pretrained={ckpt}"))


# --------------------------------------------------------------------------- HiViT (iTPN)


def test_hivit_layer_ids_follow_itpn_with_merges_taking_the_previous_id():
    from mim_lightning.models.classifiers.hivit import hivit_layer_id

    merges = [3, 7]  # iTPN-B "3324": blocks 0-2 MLP, 3 merge, 4-6 MLP, 7 merge, 8-31 attention; num_layers 31
    table = {"encoder.patch_embed.proj.weight": 0, "encoder.absolute_pos_embed": 0, "encoder.blocks.0.mlp.fc1.weight": 1,
             "encoder.blocks.2.norm2.weight": 3, "encoder.blocks.3.reduction.weight": 3, "encoder.blocks.4.mlp.fc2.bias": 4,
             "encoder.blocks.7.norm.weight": 6, "encoder.blocks.8.attn.qkv.weight": 7, "encoder.blocks.31.norm1.bias": 30,
             "fc_norm.weight": 31, "head.weight": 31}
    assert {n: hivit_layer_id(n, merges, 31) for n in table} == table


def test_itpn_finetune_rescales_the_decay_and_keeps_the_pretrained_features(labelled, tmp_path):
    from omegaconf import OmegaConf

    from mim_lightning import build_pretrain_module

    cfg = compose("pretrain", ["method=itpn", "backbone=hivit_test", "data.image_size=64", "experiment=null"])
    pre = build_pretrain_module(cfg).model.eval()
    config = {"backbone": OmegaConf.to_container(cfg.backbone), "data": {"image_size": 64},
              "method": {"model": {"_target_": cfg.method.model._target_}}}
    ckpt = tmp_path / "itpn.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in pre.state_dict().items()},
                "hyper_parameters": {"config": config}}, ckpt)
    module = build_finetune_module(ft_cfg(labelled, tmp_path, "method=itpn", "backbone=hivit_test",
                                          "data.image_size=64", f"pretrained={ckpt}"))
    assert module.num_layers == 4  # 1 + 1 + 1 blocks without merges, + 1
    assert module.layer_decay == pytest.approx(0.60 ** (13 / 4))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # relative position tables start at zero, so the features are the pretrained ones
        torch.testing.assert_close(module.model.eval().encoder(images), pre.encoder(images))


def nan_at_second_step(monkeypatch) -> None:
    """The training criterion returns NaN at its second call (validation uses F.cross_entropy, untouched)."""
    original, calls = nn.CrossEntropyLoss.forward, {"n": 0}

    def forward(self, logits, targets):
        calls["n"] += 1
        loss = original(self, logits, targets)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", forward)


PLAIN_CE = ["finetune.mixup=0", "finetune.cutmix=0", "finetune.smoothing=0", "trainer.max_steps=4"]


def test_finetuning_skips_a_nonfinite_step_with_on_nonfinite_skip(labelled, tmp_path, monkeypatch):
    nan_at_second_step(monkeypatch)
    run_dir = tmp_path / "skip"
    trainer = finetune(ft_cfg(labelled, run_dir, *PLAIN_CE, "on_nonfinite=skip"))
    assert trainer.lightning_module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    rows = read_metrics(run_dir)
    # the skipped step's row holds the count, and no loss, lr or gradient norm of an earlier step
    assert {int(r["step"]) for r in rows if r.get("finetune/train_loss")} == {0, 2, 3}
    assert {int(r["step"]) for r in rows if r.get("train/lr")} == {0, 2, 3}
    assert {int(r["step"]) for r in rows if r.get("train/grad_norm")} == {0, 2, 3}
    assert [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")] == [1.0]


def test_finetuning_stops_at_a_nonfinite_loss_naming_the_step(labelled, tmp_path, monkeypatch):
    from mim_lightning.errors import NonFiniteLossError

    nan_at_second_step(monkeypatch)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 1.*finetune\.lr\.base"):
        finetune(ft_cfg(labelled, tmp_path / "stop", *PLAIN_CE, "nonfinite_check_every_n_steps=1"))


def test_ema_of_the_weights_is_what_the_run_ends_with(labelled, pretrained_ckpt, tmp_path):
    # decay 1.0: the average is the weights after the first step (Lightning's AveragedModel starts from a copy) and
    # never moves, so a 2-step run with EMA must end with the weights of a 1-step run without it
    fast = [f"pretrained={pretrained_ckpt}", "finetune.lr.value=0.05", "finetune.lr.warmup_steps=0"]
    ema = finetune(ft_cfg(labelled, tmp_path / "ema", *fast, "trainer.max_steps=2",
                          "+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging",
                          "+callbacks.ema.decay=1.0")).lightning_module.model
    one_step = finetune(ft_cfg(labelled, tmp_path / "one", *fast, "trainer.max_steps=1")).lightning_module.model
    two_steps_moved = ema.blocks[0].attn.qkv.weight
    torch.testing.assert_close(two_steps_moved, one_step.blocks[0].attn.qkv.weight)
    state = torch.load(pretrained_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert (two_steps_moved - state["model.encoder.blocks.0.attn.qkv.weight"]).abs().max() > 1e-3  # it did train


def test_mixmae_linear_probe_uses_the_mixmim_encoder(labelled, tmp_path):
    from mim_lightning.models.classifiers.mixmim import MixMIMClassifier
    from mim_lightning.methods.mixmae.model import MixMAE

    pre = MixMAE(SWIN_TEST, img_size=64, decoder_dim=16, decoder_depth=1, decoder_heads=2).eval()
    ckpt = fake_checkpoint(tmp_path / "mixmae.ckpt", pre, "mim_lightning.methods.mixmae.model.MixMAE", 64)
    module = build_finetune_module(ft_cfg(labelled, tmp_path, "method=mixmae", "backbone=swin_test",
                                          "mode=linear_probe", "data.image_size=64", f"pretrained={ckpt}"))
    assert isinstance(module.model, MixMIMClassifier)  # not the SimMIM (timm Swin) classifier
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval().forward_features(images), pre.encoder(images).mean(dim=1))


# --------------------------------------------------------------------------- SimMIM with a ViT (BEiT-style)


def project_checkpoint(path: Path, cfg, model: torch.nn.Module) -> Path:
    """``model`` saved as a pretraining checkpoint of this project composed from ``cfg``."""
    from omegaconf import OmegaConf

    config = {"backbone": OmegaConf.to_container(cfg.backbone), "data": {"image_size": cfg.data.image_size},
              "method": {"model": {"_target_": cfg.method.model._target_}}}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": config}}, path)
    return path


@pytest.fixture(scope="module")
def simmim_vit(tmp_path_factory):
    """A SimMIM-ViT pretraining model (vit_test, 2 blocks, 32px) with a non-zero shared relative position table
    and layer scale away from its init, and its checkpoint."""
    from mim_lightning import build_pretrain_module

    torch.manual_seed(0)
    cfg = compose("pretrain", ["method=simmim", "backbone=vit_test", "backbone.depth=2", "data.image_size=32",
                               "mask.unit=16", "experiment=null"])
    model = build_pretrain_module(cfg).model.eval()
    with torch.no_grad():
        model.encoder.rel_pos_bias.relative_position_bias_table.normal_()  # zeros at init: make the copies visible
        for block in model.encoder.blocks:
            block.gamma_1.uniform_(0.5, 1.5)
    return model, project_checkpoint(tmp_path_factory.mktemp("simmim_vit") / "simmim_vit.ckpt", cfg, model)


def test_pretrained_alone_picks_the_stored_method_and_backbone_with_its_changed_sizes(labelled, simmim_vit, tmp_path):
    _, ckpt = simmim_vit  # pretrained with backbone=vit_test backbone.depth=2
    rest = [a for a in TINY if not a.startswith("backbone=")] + [f"data.root={labelled}", f"run_dir={tmp_path}"]
    cfg = compose("finetune", [*rest, f"pretrained={ckpt}"])
    assert cfg.finetune.method == "simmim" and cfg.backbone.name == "vit_test" and cfg.backbone.depth == 2
    assert compose("finetune", [*rest, f"pretrained={ckpt}", "backbone.depth=3"]).backbone.depth == 3  # given wins


def test_simmim_vit_finetunes_with_a_copy_of_the_shared_table_in_every_block(labelled, simmim_vit, tmp_path):
    pre, ckpt = simmim_vit
    cfg = ft_cfg(labelled, tmp_path, "method=simmim", "backbone.depth=2", f"pretrained={ckpt}",
                 "trainer.fast_dev_run=1")
    assert cfg.finetune.classifier._target_.endswith("BEiTBuilder") and cfg.finetune.layer_decay == 0.65  # the ViT values of the recipe
    module = build_finetune_module(cfg)
    model = module.model.eval()
    shared = pre.encoder.rel_pos_bias.relative_position_bias_table
    assert model.rel_pos_bias is None and len(model.blocks) == 2
    for block, source in zip(model.blocks, pre.encoder.blocks):
        torch.testing.assert_close(block.attn.relative_position_bias_table, shared)
        torch.testing.assert_close(block.gamma_1, source.gamma_1)
        torch.testing.assert_close(block.attn.q_bias, source.attn.q_bias)
    # mean pooling: the final norm is Identity and fc_norm (LN 1e-6) follows the mean of the patch tokens
    assert isinstance(model.norm, torch.nn.Identity) and model.fc_norm.eps == 1e-6 and model.pos_embed is None
    assert model.head.weight.std() < 1e-4 and torch.all(model.head.bias == 0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the pretrained encoder's tokens (its final norm applied by hand)
        torch.testing.assert_close(pre.encoder.norm(model.forward_features(images)), pre.encoder.forward_tokens(images))
        tokens = model.forward_features(images)
        torch.testing.assert_close(model(images), model.head(model.fc_norm(tokens[:, 1:].mean(dim=1))))
    # SimMIM's get_vit_layer (num_layers = depth + 2, scale = 0.65 ** (depth + 1 - id)) and its decay rule: only
    # 1-D parameters, pos_embed and cls_token are undecayed, so the per-block tables are decayed
    groups = module.param_groups(1.0)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    decay_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert scale_of["patch_embed.proj.weight"] == scale_of["cls_token"] == pytest.approx(0.65 ** 3)
    assert scale_of["blocks.0.attn.relative_position_bias_table"] == pytest.approx(0.65 ** 2)
    assert scale_of["blocks.1.gamma_2"] == pytest.approx(0.65)
    assert scale_of["head.weight"] == scale_of["fc_norm.weight"] == 1.0
    assert decay_of["blocks.0.attn.relative_position_bias_table"] == decay_of["blocks.0.attn.qkv.weight"] == 0.05
    assert decay_of["cls_token"] == decay_of["blocks.0.gamma_1"] == decay_of["blocks.0.attn.q_bias"] == 0.0
    assert finetune(cfg).state.finished


def test_simmim_vit_tables_are_resized_to_another_grid_with_the_cls_rows_kept(labelled, simmim_vit, tmp_path):
    pre, ckpt = simmim_vit
    module = build_finetune_module(ft_cfg(labelled, tmp_path, "method=simmim", "backbone.depth=2", "data.image_size=48",
                                          f"pretrained={ckpt}"))
    old = pre.encoder.rel_pos_bias.relative_position_bias_table  # (2*4-1)^2 + 3 rows
    new = module.model.blocks[1].attn.relative_position_bias_table  # (2*6-1)^2 + 3 rows
    assert old.shape == (52, 2) and new.shape == (124, 2)
    torch.testing.assert_close(new[-3:], old[-3:])  # cls-to-token, token-to-cls, cls-to-cls
    torch.testing.assert_close(new[:-3].view(11, 11, 2)[5, 5], old[:-3].view(7, 7, 2)[3, 3])  # offset 0


def test_simmim_vit_linear_probe_averages_the_tokens_of_one_block(labelled, simmim_vit, tmp_path):
    pre, ckpt = simmim_vit
    probe = ["method=simmim", "backbone.depth=2", "mode=linear_probe", f"pretrained={ckpt}"]
    cfg = ft_cfg(labelled, tmp_path, *probe, "finetune.linear_probe.block=1")
    assert cfg.finetune.linear_probe.feature == "block_avg"
    model = build_finetune_module(cfg).model.eval()
    assert len(model.blocks) == 1 and [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight",
                                                                                                       "head.1.bias"]
    images = torch.randn(2, 3, 32, 32)
    encoder = pre.encoder
    with torch.no_grad():
        x = torch.cat([encoder.cls_token.expand(2, -1, -1), encoder.embed(images)], dim=1)
        x = encoder.blocks[0](x, shared_rel_pos_bias=encoder.rel_pos_bias())
        torch.testing.assert_close(model.forward_head(model.forward_features(images), pre_logits=True),
                                   x[:, 1:].mean(dim=1))  # block 1's patch tokens, no norm, averaged
    with pytest.raises(ConfigError, match="finetune.linear_probe.block=3"):
        build_finetune_module(ft_cfg(labelled, tmp_path, *probe, "finetune.linear_probe.block=3"))
    with pytest.raises(ConfigError, match="block_avg"):
        build_finetune_module(ft_cfg(labelled, tmp_path, *probe, "finetune.linear_probe.feature=cls"))


# --------------------------------------------------------------------------- iTPN-CLIP


def test_itpn_clip_finetune_starts_from_the_clip_encoder_with_layer_scale_and_its_tables(labelled, tmp_path):
    import warnings

    from mim_lightning import build_pretrain_module

    pre_cfg = compose("pretrain", ["method=itpn_clip", "backbone=hivit_test", "data.image_size=64", "experiment=null"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random tiny teacher says it is random
        pre = build_pretrain_module(pre_cfg).model.eval()
    with torch.no_grad():  # away from their inits (tables zero, gamma 0.1) so that loading them shows
        for name, param in pre.encoder.named_parameters():
            if name.endswith(("relative_position_bias_table", "gamma_1", "gamma_2")):
                param.normal_()
    ckpt = project_checkpoint(tmp_path / "itpn_clip.ckpt", pre_cfg, pre)
    cfg = ft_cfg(labelled, tmp_path / "ft", "method=itpn_clip", "backbone=hivit_test", "data.image_size=64",
                 f"pretrained={ckpt}", "trainer.fast_dev_run=1")
    module = build_finetune_module(cfg)
    encoder = module.model.encoder
    assert encoder.blocks[0].gamma_2 is not None and encoder.blocks[-1].gamma_1 is not None  # layer scale
    for key, value in pre.encoder.state_dict().items():  # gamma, relative position tables and APE included
        torch.testing.assert_close(encoder.state_dict()[key], value, msg=key)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval().encoder(images), pre.encoder(images))
    assert module.layer_decay == pytest.approx(0.60 ** (13 / 4))  # iTPN's rescaled decay, 3 layers + 1
    assert module.lr_config["value"] == 5e-4 and module.lr_config["warmup_epochs"] == 20  # absolute lr, BEiT style
    decay_of = {n: g["weight_decay"] for g in module.param_groups(1.0) for n in g["param_names"]}
    assert decay_of["encoder.absolute_pos_embed"] == 0.0
    assert decay_of["encoder.blocks.4.attn.relative_position_bias_table"] == 0.0
    assert decay_of["encoder.blocks.4.attn.qkv.weight"] == decay_of["head.weight"] == 0.05
    # an encoder without layer scale (pixel pretraining) lacks the gamma weights: a one-line error, not a silent
    # init as the official loader's (iTPN#17)
    from mim_lightning.methods.itpn.model import ITPNPixel

    pixel = ITPNPixel(dict(pre_cfg.backbone), img_size=64, fpn_dim=16, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ConfigError, match="missing keys, e.g. encoder.blocks.0.gamma_2"):
        build_finetune_module(ft_cfg(labelled, tmp_path, "method=itpn_clip", "backbone=hivit_test",
                                     "data.image_size=64",
                                     f"pretrained={project_checkpoint(tmp_path / 'pixel.ckpt', pre_cfg, pixel)}"))
    assert finetune(cfg).state.finished


# --------------------------------------------------------------------------- recipes


def test_mae_vit_h_recipe_is_finetune_md():
    cfg = compose("finetune", ["experiment=finetune_mae_vit_h_in1k", "data.root=/data/imagenet/train"])
    recipe = cfg.finetune
    assert cfg.backbone.name == "vit_h" and cfg.backbone.patch_size == 14 and recipe.classifier.pool == "avg"
    assert (recipe.lr.base, recipe.lr.base_batch_size, recipe.layer_decay, recipe.classifier.drop_path) == \
        (1e-3, 256, 0.75, 0.3)
    assert cfg.trainer.max_epochs == 50 and recipe.lr.warmup_epochs == 5 and recipe.weight_decay == 0.05
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 1024  # 8 nodes x 8 GPUs x 16


FINETUNE_EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("finetune_*.yaml"))
#: Shrinks each family to one block per stage (widths and patch kept) so that a paper recipe builds in seconds.
SHRINK = {"vit": ["backbone.depth=1"], "swin": ["backbone.depths=[1,1,1,1]"],
          "hivit": ["backbone.depth=1", "backbone.mlp_depth=[1,1]"]}


@pytest.mark.parametrize("name", FINETUNE_EXPERIMENTS)
def test_finetune_experiments_compose(name):
    from omegaconf import OmegaConf

    from hydra.utils import get_class

    cfg = compose("finetune", [f"experiment={name}", "data.root=/data/imagenet/train"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    builder = get_class(cfg.finetune.classifier._target_)
    assert cfg.data.image_size == 224 and builder.family == cfg.backbone.family
    assert cfg.finetune.linear_probe.feature in builder.probe_features


@pytest.mark.parametrize("name, classifier", [("finetune_mae_vit_h_in1k", "VisionTransformer"),
                                              ("finetune_simmim_vit_b_in1k", "Beit"),
                                              ("finetune_itpn_clip_b_in1k", "HiViTClassifier")])
def test_new_finetune_recipes_build_at_paper_width(name, classifier):
    family = compose("finetune", [f"experiment={name}"]).backbone.family
    cfg = compose("finetune", [f"experiment={name}", "data.root=/data/imagenet/train", *SHRINK[family]])
    module = build_finetune_module(cfg, num_classes=10)
    assert type(module.model).__name__ == classifier
    assert module(torch.randn(1, 3, 224, 224)).shape == (1, 10)


# --------------------------------------------------------------------------- resuming


def test_interrupted_finetuning_resumes_to_the_weights_of_an_uninterrupted_run(labelled, pretrained_ckpt, tmp_path):
    # mid-epoch (4 batches an epoch, a crash before step 7 of 8), with what a resume must restore: drop path (torch
    # RNG), Mixup/CutMix (numpy RNG), the data order and the per-sample RandAugment/erasing in worker processes, the
    # lr schedule and the EMA of the weights (the weights the run ends with); the pretrained= file is not needed
    # to resume (it is deleted before the resume)
    own_copy = tmp_path / "pretrained.ckpt"
    shutil.copy(pretrained_ckpt, own_copy)
    run = [f"pretrained={own_copy}", "trainer.max_epochs=2", "data.num_workers=2",
           "data.val_fraction=0.1", "data.val_min_images=2", "callbacks.checkpoint.every_n_train_steps=2",
           "finetune.lr.warmup_epochs=1",
           "+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging", "+callbacks.ema.decay=0.5"]
    straight = finetune(ft_cfg(labelled, tmp_path / "straight", *run))
    assert straight.num_training_batches == 4 and straight.global_step == 8
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(ft_cfg(labelled, crashed, *run, "+callbacks.crash._target_=conftest.RaiseAtStep",
                        "+callbacks.crash.step=7"))
    saved = torch.load(crashed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 6 and saved["epoch"] == 1  # 2 of the 4 batches of epoch 1 done
    own_copy.unlink()
    resumed = finetune(ft_cfg(labelled, crashed, *run, "resume=auto"))
    assert resumed.global_step == 8
    a, b = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    fresh = build_finetune_module(ft_cfg(labelled, tmp_path, *run[1:])).state_dict()
    assert not torch.equal(a["model.blocks.0.attn.qkv.weight"], fresh["model.blocks.0.attn.qkv.weight"])  # it trained


def test_num_classes_must_match_the_class_folders_and_a_resume_keeps_the_count(labelled, tmp_path, capsys):
    from mim_lightning.cli import run_or_exit

    for given, text in ((2, "num_classes=2: data.root has 3 class sub-folders"),
                        (5, "num_classes=5: data.root has 3 class sub-folders"), (1, "at least 2 classes")):
        with pytest.raises(SystemExit) as info:
            run_or_exit(finetune, ft_cfg(labelled, tmp_path / f"n{given}", f"num_classes={given}"))
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and text in err[-1] and err[-1].startswith("mim_lightning: error: "), err
    root = tmp_path / "classes"
    shutil.copytree(labelled, root)
    run_dir = tmp_path / "run"
    finetune(ft_cfg(root, run_dir, "trainer.max_steps=2", "data.val_fraction=0"))
    shutil.copytree(root / "emu", root / "fox")  # a fourth class appears in the folder
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_or_exit(finetune, ft_cfg(root, run_dir, "trainer.max_steps=4", "data.val_fraction=0", "resume=auto"))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, err
    assert "num_classes=4" in err[-1] and "the checkpoint's head has 3 classes" in err[-1], err[-1]
    assert not any("size mismatch" in line for line in err)
