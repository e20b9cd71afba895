"""The benchmark harness (run for a couple of steps so it cannot rot) and the fast paths it measures:
no host-device sync in any method's training step, SDPA attention, fused AdamW on CUDA, compile=true."""

from __future__ import annotations

import copy
import json
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

from mim_lightning import build_datamodule, build_pretrain_module, compose, pretrain
from mim_lightning.config import group_options
from mim_lightning.optim import device_optimizer_kwargs

from conftest import tiny_overrides
from test_config import TINY_FAMILY, method_families
from test_scripts import load_script

TINY_RUN = ["data.image_size=32", "data.batch_size=4", "data.num_workers=0"]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def read_records(out):
    return [json.loads(line) for line in (out / "benchmarks.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ the harness
def test_benchmark_two_steps_at_tiny_size_writes_json_and_markdown(bench, tmp_path):
    out = tmp_path / "bench"
    argv = ["method=mae", "backbone=vit_test", *TINY_RUN, "data.num_workers=1", "--steps", "2", "--warmup", "1",
            "--loader-batches", "2", "--peak-tflops", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    [record] = read_records(out)
    assert (record["method"], record["backbone"], record["image_size"], record["batch_size"]) == ("mae", "vit_test", 32, 4)
    assert record["device"] == "cpu" and record["precision"] == "fp32" and record["compile"] is False
    assert len(record["step_s_all"]) == 2 and record["step_s"] == pytest.approx(sorted(record["step_s_all"])[0] / 2
                                                                              + sorted(record["step_s_all"])[1] / 2)
    assert record["images_per_sec"] == pytest.approx(4 / record["step_s"])
    assert record["peak_mem_mb"] > 0 and record["peak_mem_kind"] in ("rss_hwm", "ru_maxrss_process")
    # model FLOPs and utilisation against the given peak
    assert record["flops_per_step"] > 0
    assert record["mfu"] == pytest.approx(record["flops_per_step"] / record["step_s"] / 1e12)
    # the baselines, as ratios: the all-tokens encoder does more work than MAE's visible-only one
    assert record["all_tokens"]["flops_per_step"] > record["flops_per_step"]
    assert record["visible_vs_all_tokens"] == pytest.approx(record["images_per_sec"] / record["all_tokens"]["images_per_sec"])
    assert record["supervised"]["model"].startswith("vit_base_patch16_224") and record["supervised"]["flops_per_step"] > 0
    assert record["vs_supervised"] == pytest.approx(record["images_per_sec"] / record["supervised"]["images_per_sec"])
    # the loader alone, without and with its configured worker
    loader = record["loader"]
    assert loader["workers0"]["images_per_sec"] > 0 and loader["workersN"]["workers"] == 1
    assert record["loader_vs_model"] == pytest.approx(loader["workersN"]["images_per_sec"] / record["images_per_sec"])
    table = (out / "benchmarks.md").read_text()
    assert "python scripts/benchmark.py method=mae" in table and "| visible / all tokens |" in table
    assert "| mae vit_test 32px b4 | cpu | fp32 | off |" in table


@pytest.mark.parametrize("method,family", [("mixmae", "swin"), ("itpn", "hivit")])
def test_benchmark_builds_the_supervised_baseline_of_every_family(bench, tmp_path, method, family):
    overrides, size = TINY_FAMILY[family]
    out = tmp_path / method
    argv = [f"method={method}", *overrides, f"data.image_size={size}", "data.batch_size=2", "data.num_workers=0",
            "--steps", "1", "--warmup", "1", "--no-loader", "--no-flops", "--out", str(out)]
    assert bench.main(argv) == 0
    [record] = read_records(out)
    assert record["method"] == method and record["loader"] == {} and record["flops_per_step"] is None
    assert record["vs_supervised"] > 0 and "all_tokens" not in record
    expected = {"swin": "swin_base_patch4_window7_224 (window 8)", "hivit": "HiViTClassifier"}[family]
    assert record["supervised"]["model"].startswith(expected)


def test_suite_covers_every_method_small_and_base(bench, capsys):
    assert bench.main(["--suite", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(bench.SUITE) == 8
    for method in ("mae", "simmim", "mixmae", "itpn"):
        assert sum(f"method={method} " in line for line in lines) == 2
    assert sum(("backbone=vit_b " in line or "backbone=swin_b " in line) and "data.batch_size=8" in line
               for line in lines) == 3
    assert all("steps 1+3" in line for line in lines)


def test_bad_options_are_one_line_errors(bench, tmp_path, capsys):
    assert bench.main(["method=nope", "--out", str(tmp_path)]) == 2
    assert bench.main(["--precision", "fp16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "method='nope'" in err[0] and "--precision='fp16'" in err[1]


def test_mae_all_tokens_baseline_encodes_every_patch_with_the_same_modules(bench):
    cfg = compose("pretrain", ["method=mae", "backbone=vit_test", *TINY_RUN])
    module = build_pretrain_module(cfg)
    recipe = dict(optimizer=module.optimizer_factory, weight_decay=module.weight_decay,
                  no_weight_decay=module.no_weight_decay, no_weight_decay_keys=module.no_weight_decay_keys,
                  lr=module.lr_config, batch_size=module.batch_size)
    baseline = bench.mae_all_tokens_module(cfg, type(module), recipe)
    model = baseline.model
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :3] = True  # 12 of 16 hidden
    out = model(torch.randn(2, 3, 32, 32), mask)
    assert out.latent.shape == (2, 1 + 16, 32)  # every patch went through the encoder (MAE: 1 + 4)
    assert module.model(torch.randn(2, 3, 32, 32), mask).latent.shape == (2, 1 + 4, 32)
    out.loss.backward()
    assert model.encoder_mask_token.grad.abs().sum() > 0
    # the same parameters as MAE plus the encoder's mask token
    names = set(dict(model.named_parameters())) - set(dict(module.model.named_parameters()))
    assert names == {"encoder_mask_token"}


# ------------------------------------------------------------------------- no host-device sync per step
def method_cases():
    return [(method, family) for method in group_options("method") for family in method_families(method)]


@pytest.mark.parametrize("method,family", method_cases())
def test_training_step_has_no_host_device_sync(method, family):
    """Forward and backward of every method on the meta device, with the batch moved as the pretraining
    module moves it (mask left on the host): any ``.item()``, ``bool(tensor)`` or blocking read of a device
    value would raise here, since meta tensors hold no data."""
    overrides, size = TINY_FAMILY[family]
    cfg = compose("pretrain", [f"method={method}", *overrides, f"data.image_size={size}", "data.batch_size=2",
                               "data.num_workers=0"])
    module = build_pretrain_module(cfg)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["images"].is_meta and moved["mask"].device.type == "cpu"
    model = copy.deepcopy(module.model).to("meta")
    out = model(moved["images"], mask=moved["mask"])
    out.loss.backward()
    assert out.loss.is_meta and out.pred.shape == moved["images"].shape
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.is_meta for g in grads)


def test_a_mask_on_the_device_needs_one_read_that_a_host_mask_avoids():
    """The check above can fail: MAE must read the kept count, which a device mask only gives by a sync."""
    from mim_lightning.masking import RandomMask
    from mim_lightning.models.tokens import device_unit_mask, kept_count

    rule = RandomMask(16, 4, 0.75)  # a 4x4 grid

    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :12] = True
    assert kept_count(mask) == 4
    flat, keep = device_unit_mask(mask, 2, (4, 4), rule, torch.device("meta"))
    assert keep == 4 and flat.is_meta
    with pytest.raises((RuntimeError, NotImplementedError)):
        kept_count(mask.to("meta"))
    # a drawn mask has a known count and is never read back
    drawn, keep = device_unit_mask(None, 3, (4, 4), rule, torch.device("meta"))
    assert keep == 4 and drawn.shape == (3, 16)


def test_mixmae_mask_with_a_ratio_range_is_drawn_without_reading_the_device():
    from mim_lightning.masking import mix_mask

    assert mix_mask((7, 7), 0.5, 0.2, device="meta").shape == (1, 7, 7)
    counts = {int(mix_mask((7, 7), 0.5, 0.2).sum()) for _ in range(40)}
    assert min(counts) >= 24 and max(counts) <= int(49 * 0.7) and len(counts) > 2


# ------------------------------------------------------------------------------------------ attention
def test_swin_window_attention_through_sdpa_equals_the_explicit_softmax():
    from timm.models.swin_transformer import WindowAttention

    from mim_lightning.models.backbones.swin import SwinEncoder

    torch.manual_seed(0)
    encoder = SwinEncoder(64, embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 2, 4, 8], window_size=4).eval()
    attention = [m for m in encoder.modules() if isinstance(m, WindowAttention)]
    assert len(attention) == 6 and all(m.fused_attn for m in attention)
    assert encoder.windows == [(4, 2), (4, 2), (4, 0), (2, 0)]  # stages 1-2: shifted blocks with timm's -100 mask
    images, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 16, 16) > 0.5
    fused = encoder(images, mask)
    for module in attention:
        module.fused_attn = False  # timm's explicit softmax(q k^T * scale + bias + shift mask) v
    explicit = encoder(images, mask)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)


def test_finetune_swin_classifier_uses_sdpa_and_compiles_in_place(tmp_path, class_folder):
    from timm.models.swin_transformer import WindowAttention

    from mim_lightning import build_finetune_module

    overrides = ["method=simmim", "backbone=swin_test", "data.image_size=64", f"data.root={class_folder}",
                 f"run_dir={tmp_path}"]
    plain = build_finetune_module(compose("finetune", overrides)).model
    attention = [m for m in plain.modules() if isinstance(m, WindowAttention)]
    assert attention and all(m.fused_attn for m in attention) and plain._compiled_call_impl is None
    compiled = build_finetune_module(compose("finetune", [*overrides, "compile=true", "compile_kwargs.backend=eager"]))
    assert compiled.model._compiled_call_impl is not None
    assert set(compiled.state_dict()) == {f"model.{key}" for key in plain.state_dict()}
    assert compiled.model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


# --------------------------------------------------------------------------------- optimizer, compile
def test_fused_adamw_on_cuda_only_and_never_over_an_explicit_choice():
    adamw = partial(torch.optim.AdamW, betas=(0.9, 0.95))
    assert device_optimizer_kwargs(adamw, "cuda") == {"fused": True}
    assert device_optimizer_kwargs(torch.optim.Adam, torch.device("cuda", 0)) == {"fused": True}
    assert device_optimizer_kwargs(adamw, "cpu") == {}
    assert device_optimizer_kwargs(partial(torch.optim.AdamW, foreach=True), "cuda") == {}
    assert device_optimizer_kwargs(partial(torch.optim.SGD, momentum=0.9), "cuda") == {}
    cfg = compose("pretrain", ["method=mae", "backbone=vit_test", *TINY_RUN])
    module = build_pretrain_module(cfg)
    assert device_optimizer_kwargs(module.optimizer_factory, "cuda") == {"fused": True}  # the method's AdamW


def test_compile_keeps_checkpoint_keys_and_loads_into_a_plain_model(tmp_path):
    common = ["trainer.max_steps=2", "data.num_workers=0", "~callbacks.reconstructions", "trainer.max_epochs=1"]
    plain = pretrain(compose("pretrain", tiny_overrides(tmp_path / "plain", *common)))
    compiled = pretrain(compose("pretrain", tiny_overrides(tmp_path / "compiled", *common, "compile=true",
                                                           "compile_kwargs.backend=eager")))
    model = compiled.lightning_module.model
    assert model._compiled_call_impl is not None  # compiled in place, not wrapped
    keys = lambda run: set(torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    assert keys("compiled") == keys("plain") and not any("_orig_mod" in key for key in keys("compiled"))
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    plain.lightning_module.load_state_dict(state, strict=True)
    hparams = OmegaConf.create(compiled.lightning_module.hparams.config)
    assert hparams.compile is True and hparams.compile_kwargs.backend == "eager"
