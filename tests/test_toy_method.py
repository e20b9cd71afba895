"""Adding a method touches no file of the package (issue #16): the toy method of ``tests/toy_method`` (its model
and spec) and ``tests/toy_conf`` (its three yamls) goes through pretraining with the online probes, finetuning and
linear probing from its checkpoint (``pretrained=`` alone: the method and backbone are read from the checkpoint),
and export to timm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mim_lightning import compose, finetune, pretrain
from mim_lightning.errors import ConfigError

TOY_CONF = Path(__file__).parent / "toy_conf"


@pytest.fixture
def toy_conf(monkeypatch):
    monkeypatch.setenv("MIM_LIGHTNING_CONF", str(TOY_CONF))


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    from test_probes import colour_folder

    return colour_folder(tmp_path_factory.mktemp("toy_colours"), per_class=8, size=32)


def run_pretraining(colours: Path, run_dir: Path):
    cfg = compose("pretrain", ["method=toy", "data=imagefolder", f"data.root={colours}", "data.batch_size=8",
                               "data.num_workers=0", "data.val_fraction=0.25", "trainer=cpu", "trainer.max_steps=3",
                               "callbacks=probes", "callbacks.knn.every_n_steps=2", f"run_dir={run_dir}"])
    assert cfg.backbone.name == "vit_test" and cfg.data.image_size == 32  # the toy method's own defaults
    trainer = pretrain(cfg)
    return trainer, run_dir / "checkpoints" / "last.ckpt"


def test_a_method_defined_outside_the_package_runs_its_whole_life(toy_conf, colours, tmp_path):
    from mim_lightning.export import export

    trainer, ckpt = run_pretraining(colours, tmp_path / "pre")
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    logged = "".join(path.read_text().splitlines()[0] for path in (tmp_path / "pre").rglob("metrics.csv"))
    assert "probe/knn_top1" in logged and "probe/linear_top1" in logged  # the online probes ran on its features
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["mim_lightning"]
    assert stored["method"] == "toy" and stored["encoder"]["backbone"]["name"] == "vit_test"

    common = ["data=imagefolder", f"data.root={colours}", "data.batch_size=8", "data.num_workers=0",
              "data.image_size=32", "trainer=cpu", "trainer.max_steps=2", f"pretrained={ckpt}"]
    tuned = compose("finetune", [*common, f"run_dir={tmp_path / 'ft'}"])
    assert tuned.finetune.method == "toy" and tuned.backbone.name == "vit_test"  # read from the checkpoint
    result = finetune(tuned).callback_metrics
    assert torch.isfinite(result["finetune/train_loss"]) and "finetune/val_top1" in result
    probed = finetune(compose("finetune", [*common, "mode=linear_probe", f"run_dir={tmp_path / 'lp'}"]))
    assert "finetune/val_top1" in probed.callback_metrics

    import timm

    meta = export(ckpt, tmp_path / "toy.safetensors")
    assert meta["format"] == "timm" and meta["method"].endswith("ToyMIM")
    import json

    model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0,
                              checkpoint_path=str(tmp_path / "toy.safetensors"), **json.loads(meta["timm_kwargs"]))
    pre = torch.load(ckpt, map_location="cpu", weights_only=False)
    from mim_lightning import build_pretrain_module

    module = build_pretrain_module(compose("pretrain", ["method=toy", f"run_dir={tmp_path / 'x'}"]))
    module.load_state_dict(pre["state_dict"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval().forward_features(images), module.model.eval().encoder(images), atol=1e-5)


def test_a_method_of_another_checkpoint_is_refused_in_one_line(toy_conf, colours, tmp_path):
    _, ckpt = run_pretraining(colours, tmp_path / "pre")
    with pytest.raises(ConfigError, match="method='mae'.*the checkpoint was pretrained with another method"):
        compose("finetune", ["method=mae", f"pretrained={ckpt}", f"data.root={colours}"])
