"""iTPN (pixel and CLIP) on HiViT: the DESIGN contract, masking that really drops hidden units, the
pyramid, the frozen teacher, overfitting one batch and short runs through the training entry points."""

import os
import subprocess
import sys
import warnings

import hydra
import numpy as np
import pytest
import torch

from mim_lightning import compose, pretrain
from mim_lightning.errors import ConfigError
from mim_lightning.geometry import to_pair
from mim_lightning.masking import BlockMask, RandomMask
from mim_lightning.models.backbones.hivit import HiViT, PatchMerge, hivit_from_spec
from mim_lightning.methods.itpn.model import ITPNPixel
from mim_lightning.methods.itpn_clip.model import ITPNClip
from mim_lightning.models.pos_embed import sincos_2d
from mim_lightning.optim import param_groups

from conftest import REPO

TINY = dict(name="hivit_test", family="hivit", patch_size=16, embed_dim=32, depth=1, mlp_depth=[1, 1], num_heads=2,
            mlp_ratio=2.0, bridge_mlp_ratio=2.0)
TINY_TEACHER = dict(model_kwargs=dict(embed_dim=32, depth=1, num_heads=2, num_classes=24))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the spinning
    threads slow them down by 10-100x; restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pixel(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=64, fpn_dim=16, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    options.update(kwargs)
    return ITPNPixel(dict(TINY, **options.pop("backbone", {})), **options)


def tiny_clip(teacher=None, **kwargs):
    torch.manual_seed(0)
    options = dict(img_size=64, fpn_dim=16, drop_path_rate=0.0)
    options.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ITPNClip(dict(TINY, **options.pop("backbone", {})), teacher={**TINY_TEACHER, **(teacher or {})}, **options)


def unit_masks(generator, batch, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([generator(rng) for _ in range(batch)]))


def hidden_pixels(mask, unit=16):
    return mask.repeat_interleave(unit, 1).repeat_interleave(unit, 2)[:, None].expand(-1, 3, -1, -1)


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("build", [tiny_pixel, tiny_clip], ids=["pixel", "clip"])
def test_design_contract(build):
    model = build()
    images = torch.randn(3, 3, 64, 64)
    out = model(images)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.pred.shape == images.shape
    assert out.mask.shape == (3, 4, 4) and out.mask.dtype == torch.bool
    expected = 16 - int(16 * 0.25) if build is tiny_pixel else round(16 * 0.4)
    assert torch.all(out.mask.flatten(1).sum(1) == expected)
    mask = unit_masks(RandomMask(64, 16, 0.5) if build is tiny_pixel else BlockMask(64, 16, 0.4), 3)
    first, second = model(images, mask), model(images, mask)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.mask, mask)


def test_same_weights_from_the_same_seed_give_the_same_clip_loss():
    images = torch.randn(2, 3, 64, 64)
    mask = unit_masks(BlockMask(64, 16, 0.4), 2)
    assert torch.equal(tiny_clip()(images, mask).loss, tiny_clip()(images, mask).loss)


def test_itpn_b_shapes_follow_the_official_trace():
    model = ITPNPixel(dict(TINY, embed_dim=512, num_heads=8, mlp_ratio=4.0, bridge_mlp_ratio=3.0), img_size=224,
                      decoder_depth=1)
    enc = model.encode(torch.randn(1, 3, 224, 224))
    assert [tuple(level.shape) for level in enc.levels] == [(1, 49, 1, 1, 256), (1, 49, 2, 2, 256), (1, 49, 4, 4, 256)]
    assert enc.latent.shape == (1, 49, 512) and enc.mask.sum() == 147
    x, features = model.encoder.forward_stem(torch.randn(1, 3, 224, 224))
    assert x.shape == (1, 196, 512)
    assert [tuple(f.shape) for f in features] == [(1, 196, 4, 4, 128), (1, 196, 2, 2, 256)]
    assert model.decoder(enc.levels, enc.ids_restore).shape == (1, 196, 768)


def test_pyramid_levels_of_the_tiny_models():
    pixel = tiny_pixel()
    mask = unit_masks(RandomMask(64, 16, 0.75), 2)
    levels = pixel.encode(torch.randn(2, 3, 64, 64), mask).levels
    assert [tuple(level.shape) for level in levels] == [(2, 4, 1, 1, 16), (2, 4, 2, 2, 16), (2, 4, 4, 4, 16)]
    clip = tiny_clip()
    captured = {}
    clip.pyramid.register_forward_hook(lambda m, i, o: captured.setdefault("levels", o))
    clip(torch.randn(2, 3, 64, 64))
    assert [tuple(level.shape) for level in captured["levels"]] == [(2, 16, 1, 1, 16), (2, 16, 2, 2, 16), (2, 16, 4, 4, 16)]


# --------------------------------------------------------------------------- masking really drops units
def test_hidden_units_never_influence_visible_encoder_outputs():
    model = tiny_pixel().eval()
    images = torch.randn(2, 3, 64, 64)
    mask = unit_masks(RandomMask(64, 16, 0.5), 2)
    base = model.encode(images, mask)
    changed = images.clone()
    hidden = hidden_pixels(mask)
    changed[hidden] = torch.randn(int(hidden.sum())) * 5
    other = model.encode(changed, mask)
    torch.testing.assert_close(other.latent, base.latent, rtol=0, atol=0)
    for a, b in zip(other.levels, base.levels):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # while a change in a visible unit does reach the encoder output
    changed = images.clone()
    changed[~hidden] += 1.0
    assert not torch.allclose(model.encode(changed, mask).latent, base.latent)


def test_stems_never_mix_units_and_attention_does():
    encoder = hivit_from_spec(TINY, 64).eval()
    images = torch.randn(1, 3, 64, 64)
    stem, _ = encoder.forward_stem(images)
    changed = images.clone()
    changed[:, :, :16, :16] += 1.0  # unit 0 only
    stem2, _ = encoder.forward_stem(changed)
    moved = (stem2 - stem).abs().amax(-1)[0]
    assert moved[0] > 0 and torch.all(moved[1:] == 0)
    assert torch.all((encoder(changed) - encoder(images)).abs().amax(-1) > 0)


def test_relative_position_bias_follows_the_kept_units_in_any_order():
    encoder = hivit_from_spec(TINY, 64, rpe=True).eval()
    torch.nn.init.normal_(encoder.main_blocks[0].attn.relative_position_bias_table, std=1.0)
    keep = torch.tensor([[0, 5, 9, 15, 2]])
    order = torch.tensor([3, 0, 4, 1, 2])
    images = torch.randn(1, 3, 64, 64)
    out = encoder(images, keep)
    torch.testing.assert_close(encoder(images, keep[:, order]), out[:, order])
    # and the bias matters: a zero table gives something else
    torch.nn.init.zeros_(encoder.main_blocks[0].attn.relative_position_bias_table)
    assert not torch.allclose(encoder(images, keep), out)


def test_clip_mask_token_replaces_hidden_units_and_laterals_can_be_masked():
    images = torch.randn(2, 3, 64, 64)
    mask = unit_masks(BlockMask(64, 16, 0.4), 2)
    changed = images.clone()
    hidden = hidden_pixels(mask)
    changed[hidden] = torch.randn(int(hidden.sum()))
    for mask_laterals in (False, True):
        model = tiny_clip(mask_laterals=mask_laterals).eval()
        flat = mask.flatten(1)
        main, aux, latent = model.predict(images, flat)
        main2, aux2, latent2 = model.predict(changed, flat)
        # the main stage and the auxiliary branch only see the mask token at hidden units
        torch.testing.assert_close(latent2, latent)
        torch.testing.assert_close(aux2, aux)
        # the pyramid's laterals come from the stems, which see every unit (official), unless masked
        assert torch.allclose(main2, main) == mask_laterals


# --------------------------------------------------------------------------- the teacher
def test_teacher_is_frozen_gets_no_gradient_and_stays_in_eval_mode():
    model = tiny_clip()
    teacher_params = list(model.teacher.parameters())
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    model.train()
    assert model.training and not model.teacher.training and not model.teacher.model.training
    before = [p.detach().clone() for p in teacher_params]
    groups = param_groups(model, 0.05, skip=["absolute_pos_embed"])
    optimized = {id(p) for group in groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher_params}
    assert {id(p) for p in model.encoder.parameters()} <= optimized
    optimizer = torch.optim.AdamW([p for group in groups for p in group["params"]], lr=1e-2)
    for _ in range(2):
        loss = model(torch.randn(2, 3, 64, 64)).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher_params)
        assert model.encoder.patch_embed.proj.weight.grad is not None
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher_params))


def test_teacher_weights_stay_out_of_the_state_dict_and_loading_is_strict():
    model = tiny_clip()
    state = model.state_dict()
    assert state and not any("teacher" in key for key in state)
    assert "mask_token" in state and "lm_head.weight" in state and "cls_pt_layers.1.gamma_1" in state
    fresh = tiny_clip(teacher=dict(seed=0))
    torch.nn.init.zeros_(fresh.lm_head.weight)
    fresh.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 64, 64)
    mask = unit_masks(BlockMask(64, 16, 0.4), 2)
    assert torch.equal(fresh(images, mask).loss, model(images, mask).loss)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "lm_head.weight"})


def test_teacher_from_a_local_checkpoint(tmp_path):
    import timm

    source = timm.create_model("vit_base_patch16_clip_quickgelu_224.openai", pretrained=False, img_size=64,
                               **TINY_TEACHER["model_kwargs"])
    path = tmp_path / "clip.pth"
    torch.save(source.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no random-teacher warning
        model = tiny_clip(teacher=dict(checkpoint=str(path), allow_random=False, seed=123))
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.teacher.model.state_dict()[name], value, msg=name)
    assert model.teacher.dim == 24 and model.lm_head.out_features == 24


def test_teacher_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"method.model.teacher.checkpoint=.*no such file"):
        tiny_clip(teacher=dict(checkpoint=str(tmp_path / "missing.pth")))
    with pytest.raises(ConfigError, match=r"method.model.teacher.checkpoint=None.*random teacher"):
        tiny_clip(teacher=dict(allow_random=False))
    with pytest.raises(ConfigError, match=r"method.model.teacher.source='hub'"):
        tiny_clip(teacher=dict(source="hub"))
    with pytest.raises(ConfigError, match=r"method.model.teacher.model_name='no_such_model'"):
        tiny_clip(teacher=dict(model_name="no_such_model"))
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED.*tests only"):
        ITPNClip(TINY, img_size=64, fpn_dim=16, teacher=TINY_TEACHER)


def test_open_clip_teacher_needs_the_package():
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"method.model.teacher.source='open_clip'.*not installed"):
            tiny_clip(teacher=dict(source="open_clip", model_name="ViT-B-16", model_kwargs=None))
    else:
        pytest.skip("open_clip is installed")


def test_teacher_targets_are_layer_normed_clip_features_of_clip_normalized_images():
    model = tiny_clip(data_mean=(0.5, 0.5, 0.5), data_std=(0.25, 0.25, 0.25))
    teacher = model.teacher
    pixels = torch.rand(2, 3, 64, 64)
    images = (pixels - 0.5) / 0.25
    clip_input = (pixels - teacher.clip_mean) / teacher.clip_std
    torch.testing.assert_close(teacher.prepare(images), clip_input)
    tokens = teacher.model.forward_features(clip_input)[:, 1:]
    expected = torch.nn.functional.layer_norm(teacher.model.head(tokens), (24,))
    target = teacher(images)
    torch.testing.assert_close(target, expected)
    assert target.shape == (2, 16, 24)
    assert not target.requires_grad
    quirk = tiny_clip(teacher=dict(official_scaling=True), data_mean=(0.5, 0.5, 0.5), data_std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(quirk.teacher.prepare(images), ((pixels + 1) / 2 - teacher.clip_mean) / teacher.clip_std)


def test_teacher_runs_at_unit_grid_times_its_patch():
    model = tiny_clip(teacher=dict(model_kwargs=dict(TINY_TEACHER["model_kwargs"], patch_size=8)))
    assert model.teacher.image_size == (32, 32)  # 4x4 units x 8px teacher patches
    assert model.teacher(torch.randn(1, 3, 64, 64)).shape == (1, 16, 24)


def test_clip_loss_is_smooth_l1_of_both_heads_on_all_units():
    model = tiny_clip()
    images = torch.randn(2, 3, 64, 64)
    mask = unit_masks(BlockMask(64, 16, 0.4), 2)
    out = model(images, mask)
    main, aux, _ = model.predict(images, mask.flatten(1))
    target = model.teacher(images)
    main_loss = torch.nn.functional.smooth_l1_loss(main, target)
    aux_loss = torch.nn.functional.smooth_l1_loss(aux, target)
    torch.testing.assert_close(out.loss, main_loss + aux_loss)
    torch.testing.assert_close(out.losses["loss_main"], main_loss)
    # pred maps the per-unit agreement (cosine) to grey levels in normalized space
    grey = (torch.nn.functional.cosine_similarity(main, target, dim=-1) + 1) / 2
    corner = out.pred[:, 0, 0, 0] * 0.229 + 0.485
    torch.testing.assert_close(corner, grey[:, 0])


# --------------------------------------------------------------------------- numerics
def test_official_initialisation_and_layout():
    pixel = tiny_pixel()
    enc = pixel.encoder
    assert isinstance(enc.blocks[1], PatchMerge) and isinstance(enc.blocks[3], PatchMerge) and len(enc.blocks) == 5
    assert enc.absolute_pos_embed.requires_grad
    torch.testing.assert_close(enc.absolute_pos_embed[0], sincos_2d(32, (4, 4)))
    assert not pixel.decoder.decoder_pos_embed.requires_grad
    assert enc.blocks[0].norm1 is None and enc.blocks[0].attn is None and enc.blocks[0].gamma_2 is None
    assert enc.patch_embed.norm.eps == 1e-6 and enc.blocks[4].norm1.eps == 1e-6 and pixel.decoder.decoder_norm.eps == 1e-6
    assert enc.blocks[4].attn.relative_position_bias_table is None
    assert "relative_position_index" not in enc.state_dict()
    qkv = enc.blocks[4].attn.qkv.weight
    assert 0.017 < qkv.std() < 0.023 and abs(qkv.mean()) < 0.005 and torch.all(enc.blocks[4].attn.qkv.bias == 0)
    names = set(pixel.state_dict())
    for key in ("encoder.blocks.1.reduction.weight", "encoder.blocks.4.attn.qkv.weight", "pyramid.align_dim_16tofpn.weight",
                "pyramid.split_16to8.reduction.weight", "pyramid.block_8to4.0.mlp.fc1.weight", "pyramid.fpn_modules.2.norm2.weight",
                "decoder.decoder_embed.2.1.weight", "decoder.mask_token", "decoder.decoder_pred.weight"):
        assert key in names, key

    clip = tiny_clip()
    enc = clip.encoder
    assert torch.all(enc.blocks[0].gamma_2 == 0.1) and enc.blocks[0].gamma_1 is None
    assert torch.all(enc.blocks[4].gamma_1 == 0.1) and torch.all(enc.blocks[4].attn.relative_position_bias_table == 0)
    assert not torch.allclose(enc.absolute_pos_embed[0], sincos_2d(32, (4, 4)))  # trunc-normal, as the official
    assert clip.cls_pt_layers[0].norm1.eps == 1e-5 and clip.norm.eps == 1e-6 and len(clip.cls_pt_layers) == 2
    assert [m.out_features for m in (e[1] for e in clip.decoder_embed)] == [32, 8, 2]


def test_hivit_sizes(monkeypatch):
    monkeypatch.setattr(HiViT, "reset_parameters", lambda self: None)  # count parameters on the meta device
    sizes = {}
    for option in ("hivit_t", "hivit_s", "hivit_b", "hivit_l"):
        cfg = compose("pretrain", [f"backbone={option}"]).backbone
        with torch.device("meta"):
            sizes[option] = sum(p.numel() for p in HiViT(224, **{k: cfg[k] for k in (
                "patch_size", "embed_dim", "depth", "mlp_depth", "num_heads", "mlp_ratio", "bridge_mlp_ratio")}).parameters())
    assert 77e6 < sizes["hivit_b"] < 79e6 and 286e6 < sizes["hivit_l"] < 289e6  # paper: 79M / 288M with the head
    assert sizes["hivit_t"] < sizes["hivit_s"] < sizes["hivit_b"]


@pytest.mark.parametrize("change,pattern", [
    (dict(backbone=dict(family="vit", name="vit_b")), r"backbone='vit_b'.*hivit_\* backbones for iTPN"),
    (dict(img_size=72), r"data.image_size=72"),
    (dict(backbone=dict(patch_size=10)), r"backbone.patch_size=10"),
    (dict(backbone=dict(mlp_depth=[1])), r"backbone.mlp_depth=\[1\]"),
    (dict(backbone=dict(num_heads=3)), r"backbone.num_heads=3"),
    (dict(decoder_dim=24), r"method.model.decoder_dim=24"),
    (dict(mask_ratio=1.0), r"mask.ratio=1.0"),
    (dict(ape_init="zeros"), r"method.model.ape_init='zeros'"),
])
def test_bad_sizes_are_config_errors(change, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_pixel(**change)


def test_masks_on_the_wrong_grid_or_with_uneven_counts_are_rejected():
    with pytest.raises(ConfigError, match=r"mask=\(2, 8, 8\).*\(2, 4, 4\)"):
        tiny_pixel()(torch.randn(2, 3, 64, 64), torch.zeros(2, 8, 8, dtype=torch.bool))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, :3] = True
    mask[1, 0, :2] = True
    with pytest.raises(ConfigError, match="same number of hidden"):
        tiny_pixel()(torch.randn(2, 3, 64, 64), mask)
    with pytest.raises(ConfigError, match=r"mask=\(2, 2, 2\)"):
        tiny_clip()(torch.randn(2, 3, 64, 64), torch.zeros(2, 2, 2, dtype=torch.bool))


# --------------------------------------------------------------------------- official position-embedding resampling
def resampled_by_hand(table, grid):
    """The official interpolate_pos_encoding written out here: the (1, N, C) table as a (1, C, gh, gw) image,
    bicubic F.interpolate with scale_factor (g + 0.1) / g per axis, back to (1, N, C)."""
    gh, gw = grid
    image = table.detach().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(image, scale_factor=((gh + 0.1) / gh, (gw + 0.1) / gw), mode="bicubic")
    assert out.shape[-2:] == (gh, gw)
    return out.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)


@pytest.mark.parametrize("size", [64, (64, 96)], ids=["square", "rectangular"])
def test_official_pos_resample_gives_the_loss_of_the_resampled_table(size):
    model = tiny_pixel(img_size=size).eval()
    assert model.encoder.official_pos_resample  # the default, as conf/method/itpn.yaml
    grid = model.grid
    change = (resampled_by_hand(model.encoder.absolute_pos_embed, grid) - model.encoder.absolute_pos_embed).abs().amax()
    assert 0 < change < 0.5  # a small shift of the sin-cos init (0.10 at iTPN-B/224)
    # fixed weights far from init (at init the tiny decoder barely uses the encoder: the loss would move by ~1e-7)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
        model.encoder.absolute_pos_embed.normal_(std=2.0)  # a rough table, whose resampling moves a lot
    images = torch.randn(2, 3, *to_pair(size))
    mask = unit_masks(RandomMask(size, 16, 0.75), 2)
    with torch.no_grad():
        out = model(images, mask)
        # the same weights with the switch off, but the hand-resampled table stored
        reference = tiny_pixel(img_size=size, official_pos_resample=False).eval()
        reference.load_state_dict(model.state_dict())
        raw = reference(images, mask)
        reference.encoder.absolute_pos_embed.copy_(resampled_by_hand(model.encoder.absolute_pos_embed, grid))
        torch.testing.assert_close(reference(images, mask).loss, out.loss, rtol=1e-7, atol=0)
    # and the resampling does change the loss, well beyond fp32 noise
    assert (raw.loss - out.loss).abs() > 1e-5 * out.loss


def test_official_pos_resample_keeps_the_stored_table_when_all_units_are_present():
    encoder = hivit_from_spec(TINY, 64, official_pos_resample=True).eval()
    plain = hivit_from_spec(TINY, 64).eval()
    plain.load_state_dict(encoder.state_dict())
    table = encoder.absolute_pos_embed
    everything = torch.arange(16).repeat(2, 1)
    assert encoder.pos_embed() is table  # no keep_ids: finetuning, iTPN-CLIP, export
    torch.testing.assert_close(encoder.pos_embed(everything), table.expand(2, -1, -1), rtol=0, atol=0)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(encoder(images, everything), plain(images, everything), rtol=0, atol=0)
    torch.testing.assert_close(encoder(images), plain(images), rtol=0, atol=0)
    # while with units dropped the kept ones get rows of the resampled table
    keep = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4]])
    expected = resampled_by_hand(table, (4, 4))[0][keep]
    torch.testing.assert_close(encoder.pos_embed(keep), expected)
    assert not torch.allclose(plain.pos_embed(keep), expected)


def test_official_pos_resample_runs_in_fp32_under_bf16_and_passes_the_gradient():
    encoder = hivit_from_spec(TINY, 64, official_pos_resample=True)
    keep = torch.tensor([[0, 5, 9, 15]])
    exact = encoder.pos_embed(keep)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = encoder.pos_embed(keep)
        tokens = encoder(torch.randn(1, 3, 64, 64), keep)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=0, atol=0)
    assert torch.isfinite(tokens).all()
    exact.sum().backward()
    assert encoder.absolute_pos_embed.grad is not None and encoder.absolute_pos_embed.grad.abs().sum() > 0
    half = hivit_from_spec(TINY, 64, official_pos_resample=True).to(torch.bfloat16)
    assert half.pos_embed(keep).dtype == torch.bfloat16  # cast back to the table's dtype (bf16-true runs)
    with pytest.raises(ConfigError, match=r"method.model.official_pos_resample='yes'"):
        tiny_pixel(official_pos_resample="yes")


def test_the_pixel_configs_switch_the_official_resampling_on():
    for overrides in (["method=itpn"], ["experiment=itpn_b_in1k", "data.root=/tmp/x"]):
        cfg = compose("pretrain", overrides)
        assert cfg.method.model.official_pos_resample is True, overrides
    cfg = compose("pretrain", ["method=itpn", "backbone=hivit_test", "data.image_size=64",
                               "method.model.official_pos_resample=false"])
    model = hydra.utils.instantiate(cfg.method.model)
    assert isinstance(model, ITPNPixel) and not model.encoder.official_pos_resample


def test_clip_experiment_uses_the_official_normalization_and_scaling():
    cfg = compose("pretrain", ["experiment=itpn_clip_b_in1k", "data.root=/tmp/x"])
    assert list(cfg.data.mean) == list(cfg.data.std) == [0.5, 0.5, 0.5]
    assert list(cfg.method.model.data_mean) == list(cfg.method.model.data_std) == [0.5, 0.5, 0.5]
    assert cfg.method.model.teacher.official_scaling is True
    finetune = compose("finetune", ["experiment=finetune_itpn_clip_b_in1k", "data.root=/tmp/x"])
    assert list(finetune.data.mean) == list(finetune.data.std) == [0.5, 0.5, 0.5]
    # the method defaults keep ImageNet statistics and the plain CLIP normalization of the teacher
    default = compose("pretrain", ["method=itpn_clip"])
    assert list(default.data.mean) == [0.485, 0.456, 0.406] and default.method.model.teacher.official_scaling is False
    # and with that recipe the teacher sees the official input: ((x + 1) / 2 - CLIP mean) / CLIP std of the [0, 1] image
    model = tiny_clip(teacher=dict(official_scaling=True), data_mean=(0.5, 0.5, 0.5), data_std=(0.5, 0.5, 0.5))
    pixels = torch.rand(2, 3, 64, 64)
    teacher = model.teacher
    torch.testing.assert_close(teacher.prepare((pixels - 0.5) / 0.5),
                               ((pixels + 1) / 2 - teacher.clip_mean) / teacher.clip_std)


# --------------------------------------------------------------------------- learning
def overfit(model, images, mask, steps, lr):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = model(images, mask).loss.item()
    for _ in range(steps):
        loss = model(images, mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first, model(images, mask).loss.item()


def test_tiny_pixel_model_overfits_one_batch():
    model = tiny_pixel()
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    first, last = overfit(model, images, unit_masks(RandomMask(64, 16, 0.5), 4), 250, 3e-3)
    assert last < 0.1 * first


def test_tiny_clip_model_overfits_one_batch():
    model = tiny_clip()
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    first, last = overfit(model, images, unit_masks(BlockMask(64, 16, 0.4), 4), 150, 3e-3)
    assert last < 0.1 * first


# --------------------------------------------------------------------------- runs
def run_overrides(tmp_path, image_folder, method):
    return [f"method={method}", "backbone=hivit_test", "trainer=cpu", "data=folder", f"data.root={image_folder}",
            "data.image_size=64", "data.batch_size=4", "data.num_workers=0", "trainer.enable_progress_bar=false",
            "~callbacks.progress_bar", f"run_dir={tmp_path / method}"]


def test_pixel_fast_dev_run(tmp_path, image_folder):
    trainer = pretrain(compose("pretrain", [*run_overrides(tmp_path, image_folder, "itpn"), "trainer.fast_dev_run=2"]))
    assert trainer.global_step == 2
    assert type(trainer.lightning_module.model).__name__ == "ITPNPixel"


def test_clip_fast_dev_run_through_the_cli(tmp_path, image_folder):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "mim_lightning.train", *run_overrides(tmp_path, image_folder, "itpn_clip"),
                             "trainer.fast_dev_run=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in output
    assert "RANDOMLY INITIALISED" in output


def test_clip_checkpoint_resumes_without_teacher_weights(tmp_path, image_folder):
    overrides = [*run_overrides(tmp_path, image_folder, "itpn_clip"), "trainer.max_steps=2", "~callbacks.reconstructions"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = pretrain(compose("pretrain", overrides))
    ckpt = tmp_path / "itpn_clip" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert not any("teacher" in key for key in state) and "model.lm_head.weight" in state
    overrides[-2] = "trainer.max_steps=3"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        resumed = pretrain(compose("pretrain", [*overrides, f"ckpt_path={ckpt}"]))
    assert trainer.global_step == 2 and resumed.global_step == 3
