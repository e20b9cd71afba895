"""MixMAE: mixing, same-image attention, dual reconstruction, the recipe, and a CLI run."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mim_lightning import build_datamodule, build_mask_generator, build_pretrain_module, compose
from mim_lightning.errors import ConfigError
from mim_lightning.losses import patchify
from mim_lightning.masking import MixMask, mix_mask
from mim_lightning.models.backbones.mixmim import MixMIMEncoder, stage_window
from mim_lightning.methods.mixmae.model import MixMAE, unmix
from mim_lightning.models.pos_embed import sincos_2d
from mim_lightning.optim import param_groups

from conftest import REPO

SWIN_TEST = dict(name="swin_test", family="swin", patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                 num_heads=[1, 2, 4, 8], mlp_ratio=2.0)
SWIN_B = dict(name="swin_b", family="swin", patch_size=4, embed_dim=128, depths=[2, 2, 18, 2],
              num_heads=[4, 8, 16, 32], mlp_ratio=4.0)
#: At 96px the stage maps are 24/12/6/3 and the 32px units 8/4/2/1 tokens wide, so 12x12 windows
#: at stage 1 hold tokens of both images (the 64px default of 8x8 windows would align with units).
CROSSING = dict(img_size=96, window_size=[12, 12, 6, 3])
MASK_3X3 = torch.tensor([[[True, False, False], [False, True, True], [False, True, False]]])


def tiny(**kwargs) -> MixMAE:
    torch.manual_seed(0)
    options = dict(img_size=64, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    options.update(kwargs)
    return MixMAE(SWIN_TEST, **options)


def image_tokens(latent: torch.Tensor, mask: torch.Tensor, image: int) -> torch.Tensor:
    """The encoder tokens that come from ``image`` in the mixed batch: sample i holds image i where
    the mask is not set and image B-1-i where it is."""
    flat = mask.reshape(-1)
    partner = latent.shape[0] - 1 - image
    return torch.cat([latent[image, ~flat], latent[partner, flat]])


# ------------------------------------------------------------------------------------ contract
def test_output_contract_at_tiny_size():
    model = tiny()
    images = torch.randn(4, 3, 64, 64)
    out = model(images)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.pred.shape == images.shape and out.pred.dtype == torch.float32
    assert out.mask.shape == (1, 2, 2) and out.mask.dtype == torch.bool and int(out.mask.sum()) == 2  # int(4 * 0.5)
    assert out.latent.shape == (4, 4, 8 * 16)
    assert model.encoder.windows == (8, 8, 4, 2)


def test_same_weights_mask_and_images_give_the_same_loss():
    model = tiny()
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[[True, False], [False, True]]])
    first, second = model(images, mask), model(images, mask)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.mask, mask)
    other = tiny()  # same seed, same weights
    assert torch.equal(other(images, mask).loss, first.loss)
    # the forms of the mask the model accepts all mean the same mask
    assert torch.equal(model(images, mask[0]).loss, first.loss)
    assert torch.equal(model(images, mask.expand(2, -1, -1)).loss, first.loss)


def test_swin_b_w14_follows_the_official_trace():
    torch.manual_seed(0)
    backbone = dict(SWIN_B, depths=[1, 1, 1, 1])
    model = MixMAE(backbone, img_size=224, decoder_depth=1)
    encoder = model.encoder
    assert encoder.windows == (14, 14, 14, 7)
    assert [layer.resolution for layer in encoder.layers] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    tables = [layer.blocks[0].attn.relative_position_bias_table.shape for layer in encoder.layers]
    assert tables == [(27 * 27, 4), (27 * 27, 8), (27 * 27, 16), (13 * 13, 32)]
    assert encoder.absolute_pos_embed.shape == (1, 56 * 56, 128) and encoder.num_features == 1024
    assert model.decoder.decoder_pred.out_features == 32 * 32 * 3 and model.decoder.decoder_embed.out_features == 512
    assert len(model.decoder.decoder_blocks[0].attn.qkv.weight) == 3 * 512
    assert model.decoder.decoder_blocks[0].attn.num_heads == 16
    stages = [m.shape for m in encoder.stage_masks(torch.zeros(1, 7, 7, dtype=torch.bool))]
    assert stages == [(1, 56, 56), (1, 28, 28), (1, 14, 14), (1, 7, 7)]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.mask.shape == (1, 7, 7) and int(out.mask.sum()) == 24  # int(49 * 0.5), as official
    assert out.latent.shape == (2, 49, 1024) and out.pred.shape == (2, 3, 224, 224)


def test_parameter_names_are_the_official_ones():
    names = set(tiny().state_dict())
    expected = {
        "encoder.patch_embed.proj.weight", "encoder.patch_embed.norm.weight", "encoder.absolute_pos_embed",
        "encoder.layers.0.blocks.0.norm1.weight", "encoder.layers.0.blocks.0.attn.relative_position_bias_table",
        "encoder.layers.0.blocks.0.attn.relative_position_index", "encoder.layers.0.blocks.0.attn.qkv.weight",
        "encoder.layers.0.blocks.0.attn.proj.bias", "encoder.layers.0.blocks.0.norm2.bias",
        "encoder.layers.0.blocks.0.mlp.fc1.weight", "encoder.layers.3.blocks.0.mlp.fc2.weight",
        "encoder.layers.0.downsample.norm.weight", "encoder.layers.2.downsample.reduction.weight", "encoder.norm.weight",
        "decoder.mask_token", "decoder.decoder_embed.weight", "decoder.decoder_pos_embed",
        "decoder.decoder_blocks.0.attn.qkv.weight", "decoder.decoder_norm.weight", "decoder.decoder_pred.weight",
    }
    assert expected <= names
    assert not any(name.startswith("encoder.layers.3.downsample") for name in names)
    assert "encoder.layers.0.downsample.reduction.bias" not in names


def test_patch_merging_uses_the_timm_concat_order():
    layer = tiny().encoder.layers[0]
    h, w = layer.resolution
    dim = layer.blocks[0].norm1.normalized_shape[0]
    x = torch.randn(2, h, w, dim)
    expected = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    merge = layer.downsample
    expected = merge.reduction(merge.norm(expected)).flatten(1, 2)
    torch.testing.assert_close(merge(x).flatten(1, 2), expected)
    assert merge.reduction.bias is None and merge.reduction.weight.shape == (2 * dim, 4 * dim)


# ----------------------------------------------------------------------- same-image attention
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_tokens_never_attend_across_the_two_images(dtype):
    model = tiny(**CROSSING).eval()
    windows = model.encoder.layers[0].window
    stage1 = model.encoder.stage_masks(MASK_3X3)[0]
    # the first stage-1 window really holds tokens of both images
    assert 0 < int(stage1[0, :windows, :windows].sum()) < windows * windows
    images = torch.randn(2, 3, 96, 96)
    perturbed = images.clone()
    perturbed[1] = 5 * torch.randn(3, 96, 96)  # the partner image, everywhere (inside the hidden units too)
    context = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), context:
        before = model.encoder(images, MASK_3X3).float()
        after = model.encoder(perturbed, MASK_3X3).float()
    # image 0's tokens, in both mixed samples, are exactly unchanged: the restriction is exact in every dtype
    assert torch.equal(image_tokens(before, MASK_3X3, 0), image_tokens(after, MASK_3X3, 0))
    assert not torch.allclose(image_tokens(before, MASK_3X3, 1), image_tokens(after, MASK_3X3, 1))


def test_without_the_restriction_the_images_leak_into_each_other():
    """The control for the test above: the paper's ablation (mask_attention=False) lets them mix."""
    model = tiny(**CROSSING, mask_attention=False).eval()
    images = torch.randn(2, 3, 96, 96)
    perturbed = images.clone()
    perturbed[1] = 5 * torch.randn(3, 96, 96)
    with torch.no_grad():
        before, after = model.encoder(images, MASK_3X3), model.encoder(perturbed, MASK_3X3)
    assert not torch.allclose(image_tokens(before, MASK_3X3, 0), image_tokens(after, MASK_3X3, 0))


def test_odd_batch_mixes_the_middle_sample_with_itself_without_leaking():
    model = tiny(**CROSSING).eval()
    images = torch.randn(3, 3, 96, 96)
    hidden = MASK_3X3.repeat_interleave(32, 1).repeat_interleave(32, 2)  # (1, 96, 96) pixels of set units
    perturbed = images.clone()
    perturbed[1][:, hidden[0]] = 5 * torch.randn(3, int(hidden.sum()))
    with torch.no_grad():
        before, after = model.encoder(images, MASK_3X3), model.encoder(perturbed, MASK_3X3)
    flat = MASK_3X3.reshape(-1)
    # the middle sample's tokens outside the set units see only its own pixels outside them
    assert torch.equal(before[1, ~flat], after[1, ~flat])
    assert not torch.allclose(before[1, flat], after[1, flat])
    torch.testing.assert_close(before[[0, 2]], after[[0, 2]])  # the other pair is untouched
    out = model(images, MASK_3X3)
    assert torch.isfinite(out.loss) and out.pred.shape == (3, 3, 96, 96)
    assert torch.isfinite(tiny()(torch.randn(1, 3, 64, 64)).loss)  # batch of one: mixed with itself


# ------------------------------------------------------------------------ dual reconstruction
@pytest.mark.parametrize("batch", [4, 3])
def test_unmixing_puts_every_patch_back_in_place(batch):
    """Label each decoded token with (the image visible in its row, its position): row i of the first
    half shows image i, row i of the second half shows image B-1-i. Un-mixing must return, for image i,
    tokens of image i at every position."""
    mask = MASK_3X3.reshape(1, -1)
    length = mask.shape[1]
    position = torch.arange(length).view(1, length, 1).float()
    first = 1000 * torch.arange(batch).view(-1, 1, 1).float() + position
    second = 1000 * torch.arange(batch).flip(0).view(-1, 1, 1).float() + position
    rebuilt = unmix(torch.cat([first, second]), mask)
    expected = 1000 * torch.arange(batch).view(-1, 1, 1).float() + position
    assert torch.equal(rebuilt, expected.expand(batch, length, 1))


def test_pass_through_decoder_rebuilds_the_images_exactly():
    """A decoder that returns, per row, the (norm-pix) image visible in that row makes the un-mixed
    prediction equal the input and the loss zero; the halves swapped, it does not."""
    model = tiny()
    images = torch.randn(4, 3, 64, 64)
    mask = torch.tensor([[[True, False], [True, False]]])
    target = patchify(images, 32)
    normalized = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()

    def oracle(swap):
        rows = [normalized, normalized.flip(0)]
        return lambda module, inputs, output: torch.cat(rows[::-1] if swap else rows)

    handle = model.decoder.register_forward_hook(oracle(swap=False))
    out = model(images, mask)
    handle.remove()
    assert out.loss.item() < 1e-10
    torch.testing.assert_close(out.pred, images, rtol=1e-5, atol=1e-5)
    handle = model.decoder.register_forward_hook(oracle(swap=True))
    assert model(images, mask).loss.item() > 0.5
    handle.remove()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_the_mse_over_all_tokens_of_the_unmixed_reconstruction(norm_pix):
    model = tiny(norm_pix_loss=norm_pix)
    images = torch.randn(4, 3, 64, 64)
    mask = torch.tensor([[[False, True], [True, False]]])
    captured = {}
    model.decoder.register_forward_hook(lambda m, i, o: captured.setdefault("rec", o.detach()))
    out = model(images, mask)
    rec = captured["rec"]
    assert rec.shape == (8, 4, 32 * 32 * 3)
    m = mask.reshape(1, -1, 1).float()
    unmixed = rec[:4] * m + rec[4:].flip(0) * (1 - m)  # the official arithmetic
    target = patchify(images, 32)
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)  # unbiased, as official
        expected_pixels = unmixed * (var + 1e-6).sqrt() + mean
        target = (target - mean) / (var + 1e-6).sqrt()
    else:
        expected_pixels = unmixed
    torch.testing.assert_close(out.loss, ((unmixed - target) ** 2).mean())
    torch.testing.assert_close(patchify(out.pred, 32), expected_pixels)


def test_decoder_fills_the_two_complementary_sides_with_one_mask_token():
    model = tiny()
    mask = torch.tensor([[True, False, False, True]])
    captured = {}
    model.decoder.decoder_blocks[0].register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0].detach()))
    latent = torch.randn(2, 4, 128)
    model.decoder(latent, mask)
    x = captured["x"] - model.decoder.decoder_pos_embed
    embedded = model.decoder.decoder_embed(latent).detach()
    token = model.decoder.mask_token.detach()[0, 0]
    flat = mask[0]
    torch.testing.assert_close(x[:2, ~flat], embedded[:, ~flat])
    torch.testing.assert_close(x[:2, flat], token.expand(2, 2, -1))
    torch.testing.assert_close(x[2:, flat], embedded[:, flat])
    torch.testing.assert_close(x[2:, ~flat], token.expand(2, 2, -1))


# ---------------------------------------------------------------------------------- numerics
def test_bf16_autocast_forward_is_finite_and_close_to_fp32():
    model = tiny()
    images = torch.randn(4, 3, 64, 64)
    mask = torch.tensor([[[True, False], [False, True]]])
    with torch.no_grad():
        full = model(images, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images, mask)
    assert torch.isfinite(half.loss) and torch.isfinite(half.pred).all()
    assert abs(half.loss.item() - full.loss.item()) < 0.03 * full.loss.item()
    assert (half.pred - full.pred).abs().mean() < 0.05 * full.pred.abs().mean()


def test_official_initialisation_and_weight_decay():
    model = tiny()
    enc, dec = model.encoder, model.decoder
    assert not enc.absolute_pos_embed.requires_grad and not dec.decoder_pos_embed.requires_grad
    torch.testing.assert_close(enc.absolute_pos_embed[0], sincos_2d(16, (16, 16)))
    torch.testing.assert_close(dec.decoder_pos_embed[0], sincos_2d(32, (2, 2)))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    qkv = enc.layers[1].blocks[0].attn.qkv
    bound = (6.0 / (qkv.weight.shape[0] + qkv.weight.shape[1])) ** 0.5  # xavier over the fused matrix
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.8 * bound and torch.all(qkv.bias == 0)
    table = enc.layers[0].blocks[0].attn.relative_position_bias_table
    assert 0.01 < table.std().item() < 0.03
    conv = enc.patch_embed.proj.weight  # PyTorch's default init, not re-initialized
    assert conv.abs().max() <= 1 / (3 * 4 * 4) ** 0.5
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.05, "ndim_or_bias")}
    assert id(dec.mask_token) in groups["decay"] and id(table) in groups["decay"]  # decayed, as official
    assert id(enc.absolute_pos_embed) not in groups["decay"] | groups["no_decay"]


def test_tiny_mixmae_overfits_one_batch():
    model = tiny()
    images = torch.randn(4, 3, 64, 64)
    mask = torch.tensor([[[True, False], [False, True]]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3)
    first = model(images, mask).loss.item()
    for _ in range(70):
        loss = model(images, mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first


# ---------------------------------------------------------------------------------- masks
def test_mixing_masks_follow_the_official_count_rule():
    generator = MixMask(224, 32)
    assert generator.per_batch and generator.grid == (7, 7)
    rng = np.random.default_rng(0)
    assert all(generator(rng).sum() == 24 for _ in range(5))
    ranged = MixMask(224, 32, ratio=0.5, ratio_range=0.2)
    counts = {int(ranged(rng).sum()) for _ in range(50)}
    assert min(counts) >= 24 and max(counts) <= int(49 * 0.7) and len(counts) > 3
    drawn = mix_mask((7, 7), 0.5)
    assert drawn.shape == (1, 7, 7) and int(drawn.sum()) == 24
    ranged_model = tiny(mask_ratio_range=0.25)
    assert {int(ranged_model.draw_mask().sum()) for _ in range(20)} <= {2, 3}


def test_window_rule():
    assert [stage_window((s, s), w) for s, w in [(56, 14), (28, 14), (14, 14), (7, 7)]] == [14, 14, 14, 7]
    assert [stage_window((s, s), w) for s, w in [(96, 16), (48, 16), (24, 24), (12, 12)]] == [16, 16, 24, 12]
    assert stage_window((16, 16), 14) == 8 and stage_window((48, 48), 14) == 12 and stage_window((8, 12), 14) == 4
    assert MixMIMEncoder(192, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]).windows == (12, 12, 12, 6)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(img_size=48), r"data.image_size=48: not divisible by 32"),
    (dict(mask_generator=MixMask(64, 16)), r"mask.patch_size=16.*allowed: 32, the encoder's total stride"),
    (dict(mask_generator=MixMask(128, 32)), r"mask.input_size=128.*allowed: 64"),
    (dict(window_size=[7, 7, 7]), r"method.model.window_size=\[7, 7, 7\].*one window per stage"),
    (dict(mask_ratio=1.0), r"mask.ratio=1.0"),
    (dict(mask_ratio=0.5, mask_ratio_range=0.6), r"mask.ratio_range=0.6"),
    (dict(img_size=32), r"data.image_size=32.*at least two 32px mask units"),
])
def test_bad_sizes_and_ratios_name_the_key(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        tiny(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_inputs_at_forward_name_the_key():
    model = tiny()
    with pytest.raises(ConfigError, match=r"data.image_size=96.*64x64"):
        model(torch.randn(2, 3, 96, 96))
    with pytest.raises(ConfigError, match=r"mask=.*\(1, 2, 2\)"):
        model(torch.randn(2, 3, 64, 64), torch.zeros(2, 16, 16, dtype=torch.bool))


def test_other_backbone_families_are_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone='vit_b'.*swin_\* backbones for MixMAE") as info:
        build_pretrain_module(compose("pretrain", ["method=mixmae", "backbone=vit_b", f"run_dir={tmp_path}"]))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("backbone", ["swin_t", "swin_s", "swin_b", "swin_l"])
def test_swin_sizes_build_the_mixmim_encoder(backbone, tmp_path):
    cfg = compose("pretrain", ["method=mixmae", f"backbone={backbone}", "backbone.depths=[1,1,1,1]",
                               "method.model.decoder_depth=1", "data.image_size=64", f"run_dir={tmp_path}"])
    model = build_pretrain_module(cfg).model
    assert isinstance(model, MixMAE)
    assert model.encoder.embed_dim == cfg.backbone.embed_dim and model.encoder.windows == (8, 8, 4, 2)
    heads = [layer.blocks[0].attn.num_heads for layer in model.encoder.layers]
    assert heads == list(cfg.backbone.num_heads)


def test_the_mask_group_hands_the_model_one_mask_per_batch(tmp_path, image_folder):
    cfg = compose("pretrain", ["method=mixmae", "backbone=swin_test", "data=folder", f"data.root={image_folder}",
                               "data.image_size=64", "data.batch_size=4", "data.num_workers=0", f"run_dir={tmp_path}"])
    # the grid is the backbone's output stride (backbone.stride, derived from patch_size and depths)
    assert cfg.mask._target_.endswith("MixMask") and cfg.mask.patch_size == cfg.backbone.stride == 32
    assert cfg.mask.ratio == 0.5
    generator = build_mask_generator(cfg)
    assert generator.grid == (2, 2) and generator.per_batch
    datamodule = build_datamodule(cfg)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["images"].shape == (4, 3, 64, 64) and batch["mask"].shape == (1, 2, 2)
    module = build_pretrain_module(cfg, mask_generator=datamodule.mask_generator)
    assert module.model.mask_generator is datamodule.mask_generator  # the model's own draws follow the data's rule
    out = module.model(batch["images"], batch["mask"])
    assert torch.equal(out.mask, batch["mask"].bool()) and torch.isfinite(out.loss)


def test_the_paper_recipe(tmp_path):
    cfg = compose("pretrain", ["experiment=mixmae_swin_b_in1k", "data.root=/data/imagenet/train", f"run_dir={tmp_path}"])
    assert cfg.method.model._target_.endswith("MixMAE") and cfg.backbone.name == "swin_b"
    assert cfg.data.image_size == 224 and cfg.mask.ratio == 0.5 and cfg.mask.patch_size == 32
    assert list(cfg.method.model.window_size) == [14, 14, 14, 7] and cfg.method.model.norm_pix_loss
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches == 2048
    assert cfg.method.lr.base == 1.5e-4 and cfg.method.lr.base_batch_size == 256 and cfg.method.lr.warmup_epochs == 40
    assert cfg.method.lr.schedule == "cosine" and cfg.method.lr.min == 0.0 and cfg.trainer.max_epochs == 600
    assert list(cfg.method.optimizer.betas) == [0.9, 0.95] and cfg.method.weight_decay == 0.05
    assert cfg.method.no_weight_decay == "ndim_or_bias" and not cfg.method.no_weight_decay_keys


def test_cli_fast_dev_run_with_swin_t(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    args = ["method=mixmae", "backbone=swin_t", "backbone.depths=[1,1,1,1]", "method.model.decoder_depth=1",
            "data.image_size=64", "data.batch_size=2", "data.num_workers=0", "trainer=cpu", "trainer.fast_dev_run=2",
            f"run_dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "mim_lightning.train", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in result.stderr + result.stdout


def test_the_mask_grid_follows_a_swin_with_fewer_stages(tmp_path):
    """Three stages of 2px patches: stride 8, so the mixing mask is on the 8px grid with no other key."""
    cfg = compose("pretrain", ["method=mixmae", "backbone=swin_test", "backbone.patch_size=2", "backbone.depths=[1,2,1]",
                               "backbone.num_heads=[2,4,8]", "method.model.window_size=[8,8,4]", "data.image_size=32",
                               f"run_dir={tmp_path}"])
    assert cfg.backbone.stride == cfg.mask.patch_size == 8
    model = build_pretrain_module(cfg).model
    assert model.grid == (4, 4) and model.draw_mask().shape == (1, 4, 4)


def test_an_image_size_off_the_mask_grid_is_a_one_line_error(tmp_path):
    cfg = compose("pretrain", ["method=mixmae", "backbone=swin_test", "data.image_size=80", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.image_size=80: not divisible by 32.*encoder stride") as info:
        build_mask_generator(cfg)
    assert "\n" not in str(info.value)
