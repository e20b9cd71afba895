"""SimMIM: the model contract on ViT and Swin, the loss, the mask token, masks, the recipe, bad input."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from mim_lightning import ConfigError, build_mask_generator, build_pretrain_module, compose
from mim_lightning.masking import SimMIMMask
from mim_lightning.models.backbones.simmim_vit import SimMIMViTEncoder
from mim_lightning.models.backbones.swin import SwinEncoder, stage_windows
from mim_lightning.methods.simmim.model import SimMIM

from conftest import REPO

SWIN_TINY = dict(name="swin_test", family="swin", patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                 num_heads=[1, 2, 4, 8], mlp_ratio=2.0)
VIT_TINY = dict(name="vit_test", family="vit", patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is several times faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(spec, **kwargs):
    torch.manual_seed(0)
    options = dict(img_size=64)
    options.update(kwargs)
    return SimMIM(spec, **options)


def masks_for(model, batch, seed=0):
    """Masks as the data transform makes them (numpy, per sample) for ``model``'s grid and unit."""
    generator = model.mask_generator
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([generator(rng) for _ in range(batch)]))


def pixel_mask(mask, size):
    cell = size // mask.shape[-1]
    return mask.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, None]


@pytest.mark.parametrize("spec,grid,latent", [
    (SWIN_TINY, (16, 16), (2, 4, 128)),   # 4px patches; stride-32 output 2x2 of width 8 x 16
    (VIT_TINY, (8, 8), (2, 1 + 64, 32)),  # 8px patches; cls + 64 patch tokens
])
def test_output_contract_shapes(spec, grid, latent):
    model = tiny(spec)
    images = torch.randn(2, 3, 64, 64)
    out = model(images)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.pred.shape == images.shape and out.pred.dtype == torch.float32
    assert out.mask.shape == (2, *grid) and out.mask.dtype == torch.bool
    assert out.latent.shape == latent
    # mask=None draws the default rule: ceil(0.6 * 4) = 3 of the 4 32px units
    assert torch.all(out.mask.flatten(1).sum(1) == 3 * (grid[0] // 2) ** 2)


def test_paper_size_shapes_follow_the_official_traces():
    """Swin-B at 192px: (B, 48, 48) mask, stages 48/24/12/6 with window 6, (B, 1024, 6, 6) -> 3072 channels
    -> PixelShuffle(32); ViT-B at 224px: (B, 14, 14) mask, stride-16 head."""
    swin_b = dict(name="swin_b", family="swin", patch_size=4, embed_dim=128, depths=[1, 1, 1, 1],
                  num_heads=[4, 8, 16, 32], simmim_window_size=6)
    model = SimMIM(swin_b, img_size=192)
    assert model.encoder.windows == [(6, 3), (6, 3), (6, 3), (6, 0)]
    assert model.decoder[0].out_channels == 32 * 32 * 3 and model.decoder[1].upscale_factor == 32
    out = model(torch.randn(1, 3, 192, 192))
    assert out.mask.shape == (1, 48, 48) and out.mask.sum() == 22 * 64  # 22 of 36 units, 8x8 patches each
    assert out.latent.shape == (1, 36, 1024) and out.pred.shape == (1, 3, 192, 192)

    vit_b = dict(name="vit_b", family="vit", patch_size=16, embed_dim=768, depth=1, num_heads=12)
    model = SimMIM(vit_b, img_size=224)
    assert model.decoder[0].out_channels == 16 * 16 * 3 and model.decoder[1].upscale_factor == 16
    assert model.encoder.rel_pos_bias.relative_position_bias_table.shape == (27 * 27 + 3, 12)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.mask.shape == (1, 14, 14) and out.mask.sum() == 30 * 4  # 30 of 49 units, 2x2 patches each
    assert out.latent.shape == (1, 197, 768)


def test_swin_l_window_12_and_per_image_size_default():
    swin_l = dict(family="swin", patch_size=4, embed_dim=192, depths=[1, 1, 1, 1], num_heads=[6, 12, 24, 48],
                  simmim_window_size=12)
    # 48 and 24 are windowed with 12; the 12x12 and 6x6 stages are global (no shift), as the official clamp
    assert stage_windows((48, 48), 4, 12) == [(12, 6), (12, 6), (12, 0), (6, 0)]
    assert SimMIM(swin_l, img_size=64).encoder.window_size == 4   # 12 * 64 / 192
    assert SimMIM(SWIN_TINY, img_size=64).encoder.window_size == 2  # the default 6 scaled to 64px
    assert SimMIM(SWIN_TINY, img_size=64, window_size=4).encoder.windows == [(4, 2), (4, 2), (4, 0), (2, 0)]


@pytest.mark.parametrize("spec", [SWIN_TINY, VIT_TINY], ids=["swin", "vit"])
def test_same_weights_mask_and_images_give_the_same_loss(spec):
    model = tiny(spec)
    images = torch.randn(2, 3, 64, 64)
    mask = masks_for(model, 2)
    first = model(images, mask)
    assert torch.equal(first.loss, model(images, mask).loss)
    assert torch.equal(first.mask, mask)
    clone = tiny(spec)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone(images, mask).loss, first.loss)


def test_vit_default_drop_path_is_official_and_eval_is_deterministic():
    model = tiny(dict(VIT_TINY, depth=2))
    assert model.encoder.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)  # linspace(0, 0.1, depth)
    assert tiny(dict(SWIN_TINY, depths=[2, 1, 1, 1])).encoder.layers[0].blocks[1].drop_path1.__class__.__name__ == "Identity"
    images, mask = torch.randn(2, 3, 64, 64), masks_for(model, 2)
    model.eval()  # stochastic depth makes training-mode losses random; eval mode is the contract
    assert torch.equal(model(images, mask).loss, model(images, mask).loss)


@pytest.mark.parametrize("spec", [SWIN_TINY, VIT_TINY], ids=["swin", "vit"])
def test_loss_is_l1_on_hidden_pixels_only(spec):
    model = tiny(spec, mask_unit=16)
    images = torch.randn(2, 3, 64, 64)
    mask = masks_for(model, 2)
    out = model(images, mask)
    hidden = pixel_mask(mask, 64).float()
    expected = ((out.pred - images).abs() * hidden).sum() / (hidden.sum() + 1e-5) / 3
    torch.testing.assert_close(out.loss, expected)

    def overwrite(value, where):
        def hook(module, inputs, output):
            return torch.where(where, torch.full_like(output, value), output)
        return hook

    visible = ~pixel_mask(mask, 64)
    handle = model.decoder.register_forward_hook(overwrite(1e3, visible.expand(-1, 3, -1, -1)))
    try:
        torch.testing.assert_close(model(images, mask).loss, out.loss)  # visible predictions do not count
    finally:
        handle.remove()
    handle = model.decoder.register_forward_hook(overwrite(1e3, ~visible.expand(-1, 3, -1, -1)))
    try:
        assert model(images, mask).loss > 100  # hidden ones do
    finally:
        handle.remove()


@pytest.mark.parametrize("spec", [SWIN_TINY, VIT_TINY], ids=["swin", "vit"])
def test_mask_token_replaces_hidden_tokens_only(spec):
    model = tiny(spec, mask_unit=16)
    encoder = model.encoder
    images = torch.randn(2, 3, 64, 64)
    mask = masks_for(model, 2)
    with torch.no_grad():
        embedded = encoder.embed(images, mask).reshape(2, -1, encoder.embed_dim)
        plain = encoder.patch_embed(images).reshape(2, -1, encoder.embed_dim)  # Swin: conv + LayerNorm
    flat = mask.flatten(1)
    assert torch.equal(embedded[~flat], plain[~flat])  # visible tokens untouched, bit for bit
    token = encoder.mask_token.detach().reshape(-1)
    assert torch.equal(embedded[flat], token.expand(int(flat.sum()), -1))
    # so the encoder never sees hidden pixels: changing them changes the target, not the features
    changed = images.masked_fill(pixel_mask(mask, 64).expand_as(images), 7.0)
    torch.testing.assert_close(model(changed, mask).latent, model(images, mask).latent)


def test_masks_align_to_the_unit_grid():
    cfg = compose("pretrain", ["method=simmim", "backbone=swin_test", "data.image_size=64"])
    generator = build_mask_generator(cfg)
    assert isinstance(generator, SimMIMMask) and generator.unit == 32 and generator.ratio == 0.6
    rng = np.random.default_rng(0)
    for mask in [generator(rng) for _ in range(5)] + list(SimMIM(SWIN_TINY, img_size=64)(torch.randn(3, 3, 64, 64)).mask.numpy()):
        assert mask.shape == (16, 16)
        cells = mask.reshape(2, 8, 2, 8)  # 32px units = 8x8 blocks of 4px patches, constant inside
        assert np.all(cells.all(axis=(1, 3)) == cells.any(axis=(1, 3)))
        assert cells.any(axis=(1, 3)).sum() == math.ceil(4 * 0.6)
    # the official counts: ceil(36 * 0.6) = 22 units at 192px for Swin, ceil(49 * 0.6) = 30 for ViT-B at 224px
    swin = SimMIMMask(192, 4, 0.6, 32)
    vit = SimMIMMask(224, 16, 0.6, 32)
    assert swin(rng).shape == (48, 48) and swin.num_hidden_units == 22
    assert vit(rng).shape == (14, 14) and vit.num_hidden_units == 30
    # unit and ratio are config keys
    cfg = compose("pretrain", ["method=simmim", "backbone=swin_test", "data.image_size=64", "mask.unit=16", "mask.ratio=0.5"])
    generator = build_mask_generator(cfg)
    assert generator.unit_grid == (4, 4) and generator.num_hidden_units == 8 and generator.scale == 4
    model = build_pretrain_module(cfg).model
    assert model.mask_generator.unit == 16 and model.mask_generator.ratio == 0.5


def test_lr_rule_is_per_512_images_with_scaled_warmup_and_min():
    from lightning.pytorch import Trainer

    cfg = compose("pretrain", ["~experiment", "method=simmim", "backbone=swin_test", "data.image_size=64", "data.batch_size=64"])
    assert cfg.method.lr.base == 2e-4 and cfg.method.lr.base_batch_size == 512
    module = build_pretrain_module(cfg)
    module.trainer = Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=4, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert module.effective_batch_size() == 256
    assert module.learning_rate() == pytest.approx(2e-4 * 256 / 512)
    assert module.min_and_warmup_start_lr() == (pytest.approx(1e-5 * 0.5), pytest.approx(1e-6 * 0.5))
    # the paper recipes: batch 2048 gives lr 4e-4 (800 epochs) and 8e-4 (100 epochs)
    for name, lr in [("simmim_swin_b_in1k", 4e-4), ("simmim_swin_b_100ep_in1k", 8e-4), ("simmim_vit_b_in1k", 4e-4)]:
        exp = compose("pretrain", [f"experiment={name}", "data.root=/data/imagenet/train"])
        batch = exp.data.batch_size * exp.trainer.devices * exp.trainer.num_nodes * exp.trainer.accumulate_grad_batches
        assert batch == 2048 and exp.method.lr.base * batch / exp.method.lr.base_batch_size == pytest.approx(lr)


def test_weight_decay_groups_follow_simmim():
    from mim_lightning.optim import param_groups

    cfg = compose("pretrain", ["method=simmim", "backbone=swin_test", "data.image_size=64"])
    module = build_pretrain_module(cfg)
    names = {id(p): n for n, p in module.model.named_parameters()}
    decay, plain = (sorted(names[id(p)] for p in g["params"]) for g in
                    param_groups(module.model, module.weight_decay, module.no_weight_decay, module.no_weight_decay_keys))
    assert "encoder.mask_token" in plain and "encoder.layers.0.blocks.0.attn.relative_position_bias_table" in plain
    assert "encoder.layers.0.blocks.0.attn.qkv.weight" in decay and "decoder.0.weight" in decay
    assert "decoder.0.bias" in plain and "encoder.patch_embed.norm.weight" in plain
    assert "encoder.layers.0.downsample.reduction.weight" in decay
    assert module.optimizer_factory.keywords["betas"] == [0.9, 0.999] and module.weight_decay == 0.05


def test_paper_experiments():
    swin = compose("pretrain", ["experiment=simmim_swin_b_in1k", "data.root=/data/imagenet/train"])
    assert (swin.backbone.name, swin.data.image_size, swin.method.model.window_size) == ("swin_b", 192, 6)
    assert swin.mask.unit == 32 and swin.mask.ratio == 0.6 and swin.trainer.gradient_clip_val == 5.0
    assert swin.trainer.max_epochs == 800 and swin.method.lr.warmup_epochs == 10
    assert swin.method.lr.schedule == "multistep" and list(swin.method.lr.milestones_epochs) == [700]
    assert list(swin.data.crop_scale) == [0.67, 1.0] and swin.data.interpolation == "bilinear"
    short = compose("pretrain", ["experiment=simmim_swin_b_100ep_in1k", "data.root=/data/imagenet/train"])
    assert short.trainer.max_epochs == 100 and short.method.lr.schedule == "cosine" and short.method.lr.min == 1e-5
    large = compose("pretrain", ["experiment=simmim_swin_l_in1k", "data.root=/data/imagenet/train"])
    assert large.backbone.name == "swin_l" and large.method.model.window_size == 12
    vit = compose("pretrain", ["experiment=simmim_vit_b_in1k", "data.root=/data/imagenet/train"])
    assert (vit.backbone.name, vit.data.image_size, vit.method.model.drop_path_rate) == ("vit_b", 224, 0.1)
    assert list(vit.method.no_weight_decay_keys) == ["cls_token", "pos_embed"]


def test_official_initialisation_and_norms():
    swin = tiny(SWIN_TINY).encoder
    assert swin.norm.eps == 1e-5 and swin.patch_embed.norm.eps == 1e-5
    assert swin.layers[0].blocks[0].attn.relative_position_bias_table.abs().max() > 0
    assert torch.all(swin.layers[0].blocks[0].attn.qkv.bias == 0)
    vit = SimMIMViTEncoder(64, 8, 32, depth=2, num_heads=2, mlp_ratio=2.0)
    assert vit.norm.eps == 1e-6 and vit.blocks[0].norm1.eps == 1e-6
    assert torch.all(vit.blocks[1].gamma_1 == 0.1) and torch.all(vit.blocks[1].gamma_2 == 0.1)
    assert torch.all(vit.rel_pos_bias.relative_position_bias_table == 0)
    assert vit.blocks[0].attn.q_bias is not None and not any("k_bias" in n for n, _ in vit.named_parameters())
    for weight in (vit.cls_token, vit.mask_token, vit.patch_embed.proj.weight, vit.blocks[0].attn.qkv.weight):
        assert weight.abs().max() <= 0.02  # SimMIM-ViT truncates at +-1 sigma
    for layer_id, block in enumerate(vit.blocks, start=1):  # BEiT's fix_init_weight
        bound = 0.02 / math.sqrt(2 * layer_id)
        assert bound * 0.9 < block.attn.proj.weight.abs().max() <= bound + 1e-7


def test_state_dict_keys_are_the_official_ones_and_swin_matches_timm():
    keys = set(tiny(SWIN_TINY).state_dict())
    assert {"encoder.mask_token", "encoder.patch_embed.proj.weight", "encoder.patch_embed.norm.weight", "encoder.norm.bias",
            "encoder.layers.0.blocks.0.attn.relative_position_bias_table", "encoder.layers.2.downsample.reduction.weight",
            "encoder.layers.0.blocks.0.mlp.fc2.weight", "decoder.0.weight", "decoder.0.bias"} <= keys
    assert not any(k.startswith("encoder.layers.3.downsample") for k in keys)
    keys = set(tiny(VIT_TINY).state_dict())
    assert {"encoder.cls_token", "encoder.mask_token", "encoder.rel_pos_bias.relative_position_bias_table",
            "encoder.blocks.0.attn.q_bias", "encoder.blocks.0.attn.v_bias", "encoder.blocks.0.gamma_1",
            "encoder.blocks.0.attn.qkv.weight"} <= keys
    # With shifted windows (depth 2) and no mask, the encoder is timm's Swin once timm's stage-start
    # downsample ``layers.{i+1}.downsample`` is mapped to the official stage-end ``layers.{i}.downsample``.
    torch.manual_seed(0)
    encoder = SwinEncoder(64, 4, 16, (2, 2, 2, 2), (1, 2, 4, 8), window_size=2, mlp_ratio=2.0)
    reference = timm.models.swin_transformer.SwinTransformer(
        img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=2,
        mlp_ratio=2.0, num_classes=0, drop_path_rate=0.0)
    state = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k): v
             for k, v in encoder.state_dict().items() if k != "mask_token"}
    reference.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(encoder.forward_tokens(images), reference.forward_features(images))


def test_tiny_swin_simmim_overfits_one_batch():
    model = tiny(SWIN_TINY, mask_unit=16)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    rng = np.random.default_rng(0)
    images = []
    for _ in range(4):
        freq, phase = rng.uniform(1, 4, 3), rng.uniform(0, 6.28, 3)
        images.append(np.stack([np.sin(6.28 * f * (xx + yy * (c + 1) / 3) + p) for c, (f, p) in enumerate(zip(freq, phase))]))
    images = torch.tensor(np.stack(images), dtype=torch.float32)
    mask = masks_for(model, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = model(images, mask).loss.item()
    for _ in range(40):
        loss = model(images, mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first


@pytest.mark.parametrize("build,pattern", [
    (lambda: SimMIM(dict(VIT_TINY, patch_size=16), img_size=96, mask_unit=24), r"^mask\.unit=24: .*allowed: a multiple of the model patch size 16"),
    (lambda: SimMIM(SWIN_TINY, img_size=96, mask_unit=64), r"^data\.image_size=96: not divisible by 64; allowed: a multiple of mask\.unit=64"),
    (lambda: SimMIM(SWIN_TINY, img_size=64, window_size=6), r"^data\.image_size=64: the Swin stage-1 map 16x16 is not a multiple of method\.model\.window_size=6; allowed: 96, 192, 384"),
    (lambda: SimMIM(SWIN_TINY, img_size=80, mask_unit=16), r"^data\.image_size=80: .*allowed: a multiple of the Swin encoder stride=32"),
    (lambda: SimMIM(dict(name="hivit_b", family="hivit", patch_size=16), img_size=224), r"^backbone='hivit_b': SimMIM does not support the 'hivit' family; allowed: swin_\*, vit_\* backbones"),
    (lambda: SimMIM(SWIN_TINY, img_size=64, mask_ratio=1.2), r"^mask\.ratio=1\.2"),
])
def test_bad_input_is_a_one_line_config_error(build, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        build()
    assert "\n" not in str(info.value)


def test_a_mask_on_the_wrong_grid_is_a_config_error():
    model = tiny(SWIN_TINY)
    with pytest.raises(ConfigError, match=r"mask=\(2, 2, 2\).*\(2, 16, 16\) bool mask on the 4px model-patch grid"):
        model(torch.randn(2, 3, 64, 64), torch.ones(2, 2, 2, dtype=torch.bool))
    # a per-batch (1, gh, gw) mask is shared by the batch
    shared = masks_for(model, 1)
    assert torch.equal(model(torch.randn(2, 3, 64, 64), shared).mask, shared.expand(2, -1, -1))


def test_cli_fast_dev_run_with_swin_t(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mim_lightning.train", "method=simmim", "backbone=swin_t", "backbone.depths=[1,1,1,1]",
         "data.image_size=64", "data.batch_size=4", "data.num_workers=0", "trainer=cpu", "trainer.fast_dev_run=2",
         f"run_dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in output
    # SimMIM's own base lr 2e-4 (no demo values), divided by 512: 2e-4 * 4 / 512
    assert "effective batch 4 = 4 per device x 1 devices x 1 accumulation; lr 1.56e-06" in output
