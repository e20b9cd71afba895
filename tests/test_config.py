"""Every option of every config group composes, and builds where this machine can build it."""

import pytest
import torch
from omegaconf import OmegaConf

from mim_lightning import ConfigError, build_datamodule, build_mask_generator, build_pretrain_module, compose
from mim_lightning.api import build_callbacks, build_loggers, build_trainer
from mim_lightning.config import GROUPS, group_options


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), group


def test_default_config_is_the_demo_mae_run(tmp_path):
    cfg = compose("pretrain", [f"run_dir={tmp_path}"])
    assert cfg.method.model._target_.endswith("MaskedAutoencoder")
    assert cfg.backbone.name == "vit_micro" and cfg.data.image_size == 64
    assert cfg.data.source._target_.endswith("DemoSource")
    assert cfg.trainer.accelerator == ("gpu" if torch.cuda.is_available() else "cpu")


def test_design_contract_api(tmp_path):
    cfg = compose("pretrain", ["method=mae", "backbone=vit_b", "backbone.depth=1", f"run_dir={tmp_path}"])
    module = build_pretrain_module(cfg)
    assert isinstance(module.model, torch.nn.Module)
    assert cfg.data.image_size == 224  # the method's own size: the demo's 64 px does not leak in
    out = module.model(torch.randn(1, 3, 224, 224))
    assert out.pred.shape == (1, 3, 224, 224) and out.mask.shape == (1, 14, 14)
    assert module.hparams.config["backbone"]["name"] == "vit_b"


#: Per backbone family: overrides that make a model seconds-fast to build and run, and the image size.
#: Each method's model class lists the families it supports in ``families``.
TINY_FAMILY = {
    "vit": (["backbone=vit_test"], 64),
    "swin": (["backbone=swin_test"], 64),
    "hivit": (["backbone=hivit_test"], 64),
}
#: Shrinks a paper-size backbone of each family to one block per stage (widths, heads and patch kept).
SHRINK_FAMILY = {
    "vit": (["backbone.depth=1"], lambda cfg: 4 * cfg.backbone.patch_size),
    "swin": (["backbone.depths=[1,1,1,1]"], lambda cfg: 64 * cfg.backbone.patch_size // 4),
    "hivit": (["backbone.depth=1", "backbone.mlp_depth=[1,1]"], lambda cfg: 64),
}


def method_families(method: str) -> tuple[str, ...]:
    from hydra.utils import get_class

    cfg = compose("pretrain", [f"method={method}"])
    return tuple(get_class(cfg.method.model._target_).families)


def methods_for(family: str) -> list[str]:
    return [m for m in group_options("method") if family in method_families(m)]


@pytest.mark.parametrize("option", group_options("backbone"))
def test_backbone_options_build(option, tmp_path):
    family = compose("pretrain", [f"backbone={option}"]).backbone.family
    methods = methods_for(family)
    if not methods:
        pytest.skip(f"no method uses the {family} family yet")
    shrink, image_size = SHRINK_FAMILY[family]
    cfg = compose("pretrain", [f"method={methods[0]}", f"backbone={option}", *shrink, f"run_dir={tmp_path}"])
    size = image_size(cfg)
    cfg.data.image_size = size
    model = build_pretrain_module(cfg).model
    out = model(torch.randn(2, 3, size, size))
    assert out.pred.shape == (2, 3, size, size)


@pytest.mark.parametrize("option", group_options("method"))
def test_method_options_build_for_every_family_they_support(option, tmp_path):
    for family in method_families(option):
        overrides, size = TINY_FAMILY[family]
        cfg = compose("pretrain", [f"method={option}", *overrides, f"data.image_size={size}", f"run_dir={tmp_path}"])
        module = build_pretrain_module(cfg)
        out = module.model(torch.randn(2, 3, size, size))
        assert out.loss.ndim == 0 and out.pred.shape == (2, 3, size, size)


@pytest.mark.parametrize("option", group_options("mask"))
def test_mask_options_build(option, tmp_path):
    cfg = compose("pretrain", [f"mask={option}", "data.image_size=64", f"run_dir={tmp_path}"])
    if option == "simmim":
        cfg.mask.unit = 16
    generator = build_mask_generator(cfg)
    assert generator(None).shape == (8, 8)


def test_the_mask_group_reads_nothing_of_the_method():
    """The graph runs one way: a method picks its mask (its defaults override the mask group), a mask reads the
    data and the backbone only. No mask file interpolates ``method.``, and every mask under every method
    resolves to the same values with the method removed."""
    from mim_lightning.config import CONF_DIR

    for path in sorted((CONF_DIR / "mask").glob("*.yaml")):
        assert "method." not in path.read_text(), path.name
    for method in group_options("method"):
        for mask in group_options("mask"):
            cfg = compose("pretrain", [f"method={method}", f"mask={mask}", "data.image_size=64"])
            resolved = OmegaConf.to_container(cfg.mask, resolve=True)
            without = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
            del without["method"]
            assert OmegaConf.to_container(without.mask, resolve=True) == resolved, (method, mask)
    # MixMAE's 32px grid comes from the Swin's stride; under a ViT method the same option uses the patch grid
    assert compose("pretrain", ["method=mixmae", "backbone=swin_b"]).mask.patch_size == 32
    assert compose("pretrain", ["method=mae", "backbone=vit_b", "mask=mixmae"]).mask.patch_size == 16


def test_one_mask_generator_serves_the_data_and_the_model(tmp_path, monkeypatch, image_folder):
    """``pretrain`` hands the DataModule's generator to the model (its draws for ``mask=None``); with
    ``mask=null`` there is none and the model draws by its own default rule."""
    from mim_lightning import api
    from mim_lightning.masking import SimMIMMask

    built = {}

    def fit_run(cfg, make_datamodule, make_module, log_name="train"):
        built["data"] = make_datamodule(cfg)
        built["model"] = make_module(built["data"], False).model

    monkeypatch.setattr(api, "fit_run", fit_run)
    base = ["method=simmim", "backbone=swin_test", "data=folder", f"data.root={image_folder}", "data.image_size=64",
            "data.num_workers=0", f"run_dir={tmp_path}"]
    api.pretrain(compose("pretrain", [*base, "mask.unit=16", "mask.ratio=0.5"]))
    assert built["model"].mask_generator is built["data"].mask_generator
    assert built["model"].mask_generator.unit == 16 and built["model"](torch.randn(2, 3, 64, 64)).mask.sum() == 2 * 8 * 16
    api.pretrain(compose("pretrain", [*base, "mask=null"]))
    own = built["model"].mask_generator
    assert built["data"].mask_generator is None and isinstance(own, SimMIMMask) and (own.ratio, own.unit) == (0.6, 32)


@pytest.mark.parametrize("option", group_options("data"))
def test_data_options_build(option, tmp_path, image_folder, class_folder, fashion_mnist_raw):
    root = {"folder": image_folder, "imagefolder": class_folder}.get(option)
    overrides = [f"data={option}", f"run_dir={tmp_path}", "data.num_workers=0", "data.batch_size=2"]
    if root is not None:
        overrides.append(f"data.root={root}")
    if option == "fashion_mnist":
        overrides.append(f"data.source.raw_dir={fashion_mnist_raw}")
    cfg = compose("pretrain", overrides)
    size = cfg.data.image_size  # MAE's 224 (ViT-B/16: 14x14 patches); Fashion-MNIST declares its own 32
    assert size == (32 if option == "fashion_mnist" else 224)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    item = dm.train_dataset[(0, 0)]
    assert item["images"].shape == (3, size, size) and item["mask"].shape == (size // 16, size // 16)
    assert ("label" in item) == (option in ("imagefolder", "fashion_mnist"))


@pytest.mark.parametrize("option", group_options("trainer"))
def test_trainer_options_compose(option, tmp_path):
    cfg = compose("pretrain", [f"trainer={option}", f"run_dir={tmp_path}"])
    expected = {"cpu": "32-true", "gpu": "bf16-mixed", "ddp": "bf16-mixed"}
    if option in expected:
        assert cfg.trainer.precision == expected[option]
    if option == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == -1 and cfg.trainer.num_nodes == 1
    if option in ("cpu", "auto"):
        trainer = build_trainer(cfg)
        assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("option", group_options("logger"))
def test_logger_options_build(option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers = build_loggers(compose("pretrain", [f"logger={option}", f"run_dir={tmp_path}"]))
    assert len(loggers) == 1


def test_several_loggers_at_once(tmp_path):
    cfg = compose("pretrain", ["logger=[csv,tensorboard]", f"run_dir={tmp_path}"])
    assert set(cfg.logger) == {"csv", "tensorboard"}


@pytest.mark.parametrize("option", group_options("callbacks"))
def test_callback_options_build(option, tmp_path):
    callbacks = build_callbacks(compose("pretrain", [f"callbacks={option}", f"run_dir={tmp_path}"]))
    assert callbacks


@pytest.mark.parametrize("option", group_options("experiment"))
def test_experiment_options_compose(option, tmp_path):
    from mim_lightning.cli import experiment_app

    cfg = compose(experiment_app(option), [f"experiment={option}", f"run_dir={tmp_path}",
                                           "data.root=/data/imagenet/train"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if option.startswith("mae_"):
        assert cfg.method.model.norm_pix_loss and cfg.mask.ratio == 0.75 and cfg.data.image_size == 224
        assert cfg.method.lr.base == 1.5e-4 and cfg.method.lr.warmup_epochs == 40
        assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches == 4096


def test_command_line_group_choice_beats_the_experiment(tmp_path):
    cfg = compose("pretrain", ["backbone=vit_s", f"run_dir={tmp_path}"])
    assert cfg.backbone.name == "vit_s"


@pytest.mark.parametrize("override,pattern", [
    ("method=nope", r"method='nope': no option 'nope' in conf/method/; allowed: .*mae"),
    ("backbone=vit_q", r"backbone='vit_q'.*allowed: .*vit_b"),
    ("trainer=tpu", r"trainer='tpu'.*allowed: auto, cpu, ddp, fsdp, fsdp1, gpu"),
    ("mask=random,bogus", r"mask='bogus'"),
])
def test_unknown_group_option_is_a_one_line_error(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        compose("pretrain", [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spelling", ["experiment=null", "~experiment"])
def test_experiment_null_gives_the_plain_group_defaults(spelling, tmp_path):
    cfg = compose("pretrain", [spelling, f"run_dir={tmp_path}"])
    assert cfg.backbone.name == "vit_b" and cfg.data.image_size == 224 and cfg.trainer.max_epochs == 800
