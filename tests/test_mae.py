import numpy as np
import pytest
import torch

from mim_lightning.errors import ConfigError
from mim_lightning.masking import RandomMask
from mim_lightning.methods.mae.model import MaskedAutoencoder
from mim_lightning.models.pos_embed import sincos_2d

TINY = dict(name="vit_test", family="vit", patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


def tiny_mae(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=32, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    options.update(kwargs)
    return MaskedAutoencoder(TINY, **options)


def batch_masks(generator, batch, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([generator(rng) for _ in range(batch)]))


def test_output_contract_shapes():
    model = tiny_mae()
    images = torch.randn(3, 3, 32, 32)
    out = model(images)
    assert out.loss.ndim == 0
    assert out.pred.shape == images.shape
    assert out.mask.shape == (3, 4, 4) and out.mask.dtype == torch.bool
    assert torch.all(out.mask.flatten(1).sum(1) == 16 - int(16 * 0.25))
    assert out.latent.shape == (3, 1 + 4, 32)  # cls + visible tokens only


def test_vit_b_shapes_follow_the_official_trace():
    model = MaskedAutoencoder(dict(family="vit", patch_size=16, embed_dim=768, depth=1, num_heads=12), img_size=224)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.latent.shape == (1, 50, 768)
    assert out.mask.shape == (1, 14, 14) and out.mask.sum() == 147


def test_rectangular_images():
    model = tiny_mae(img_size=(32, 48))
    out = model(torch.randn(2, 3, 32, 48))
    assert out.pred.shape == (2, 3, 32, 48) and out.mask.shape == (2, 4, 6)


def test_same_weights_mask_and_images_give_the_same_loss():
    model = tiny_mae()
    images = torch.randn(2, 3, 32, 32)
    mask = batch_masks(RandomMask(32, 8, 0.75), 2)
    assert torch.equal(model(images, mask).loss, model(images, mask).loss)
    assert torch.equal(model(images, mask).mask, mask)


def test_encoder_sees_only_visible_patches():
    model = tiny_mae().eval()
    images = torch.randn(2, 3, 32, 32)
    mask = batch_masks(RandomMask(32, 8, 0.5), 2)
    latent = model(images, mask).latent
    changed = images.clone()
    pixel_mask = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(images)
    changed[pixel_mask] = torch.randn(int(pixel_mask.sum()))
    torch.testing.assert_close(model(changed, mask).latent, latent)


def test_loss_ignores_predictions_at_visible_patches():
    model = tiny_mae()
    images = torch.randn(2, 3, 32, 32)
    mask = batch_masks(RandomMask(32, 8, 0.75), 2)
    base = model(images, mask).loss

    def corrupt_visible(module, inputs, output):
        output = output.clone()
        output[~mask.flatten(1)] = 1e3
        return output

    handle = model.decoder.register_forward_hook(corrupt_visible)
    try:
        corrupted = model(images, mask)
    finally:
        handle.remove()
    torch.testing.assert_close(corrupted.loss, base)


def test_pred_is_denormalized_with_target_patch_statistics():
    from mim_lightning.losses import patchify, unpatchify

    model = tiny_mae(norm_pix_loss=True)
    images = torch.randn(1, 3, 32, 32)
    captured = {}
    model.decoder.register_forward_hook(lambda m, i, o: captured.setdefault("pred", o.detach()))
    out = model(images)
    target = patchify(images, 8)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    expected = unpatchify(captured["pred"] * (var + 1e-6).sqrt() + mean, 8, (4, 4))
    torch.testing.assert_close(out.pred, expected)


def test_pixel_loss_without_norm_pix():
    model = tiny_mae(norm_pix_loss=False)
    images = torch.zeros(2, 3, 32, 32)
    out = model(images)
    from mim_lightning.losses import patchify

    pred = patchify(out.pred, 8)
    expected = (pred ** 2).mean(-1)[out.mask.flatten(1)].mean()
    torch.testing.assert_close(out.loss, expected)


def test_mixed_hidden_counts_in_one_batch_are_rejected():
    model = tiny_mae()
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, :3] = True
    mask[1, 0, :2] = True
    with pytest.raises(ConfigError, match="same number of hidden patches"):
        model(torch.randn(2, 3, 32, 32), mask)


def test_official_initialisation():
    model = tiny_mae()
    enc = model.encoder
    assert not enc.pos_embed.requires_grad and not model.decoder.decoder_pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed[0], sincos_2d(32, (4, 4), cls_token=True))
    assert torch.all(enc.pos_embed[0, 0] == 0)
    assert enc.norm.eps == 1e-6 and enc.blocks[0].norm1.eps == 1e-6 and model.decoder.decoder_norm.eps == 1e-6
    qkv = enc.blocks[0].attn.qkv
    bound = (6.0 / (qkv.weight.shape[0] + qkv.weight.shape[1])) ** 0.5  # xavier over the fused (3D, D) matrix
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.8 * bound
    assert torch.all(qkv.bias == 0)


def test_sincos_layout_is_column_first():
    table = sincos_2d(8, (2, 3))
    # first half encodes the column index: tokens in the same column share it
    assert torch.equal(table[0, :4], table[3, :4])  # (row 0, col 0) vs (row 1, col 0)
    assert not torch.equal(table[0, :4], table[1, :4])
    # second half encodes the row
    assert torch.equal(table[0, 4:], table[1, 4:])
    # sin(0) = 0 and cos(0) = 1 at the origin
    assert table[0].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_other_backbone_family_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"backbone='swin_b'.*vit_\* backbones for MAE"):
        MaskedAutoencoder(dict(name="swin_b", family="swin", patch_size=4, embed_dim=128, depth=2, num_heads=4))


def test_tiny_mae_overfits_one_batch():
    model = tiny_mae(norm_pix_loss=True)
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    mask = batch_masks(RandomMask(32, 8, 0.5), 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(images, mask).loss.item()
    for _ in range(300):
        loss = model(images, mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
