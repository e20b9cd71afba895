"""Issue #19: the attention path per device and dtype, MixMAE's same-image restriction in bf16, and a training
step that does no needless work (the display image is made only when ``output.pred`` is read)."""

from __future__ import annotations

import pytest
import torch

from mim_lightning.models.backbones import window_attention as wa
from mim_lightning.models.output import MIMOutput, PatchPixels

SWIN = dict(family="swin", patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], mlp_ratio=2.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture
def forced_path():
    previous = wa.set_attention_path(None)
    yield wa.set_attention_path
    wa.set_attention_path(previous)


def test_attention_path_per_device_and_dtype(forced_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert wa.attention_path(cuda, torch.bfloat16) == "sdpa" and wa.attention_path(cuda, torch.float32) == "sdpa"
    assert wa.attention_path(cpu, torch.float32) == "sdpa"
    assert wa.attention_path(cpu, torch.bfloat16) == ("explicit" if wa.NATIVE_BF16_CPU else "sdpa")
    forced_path("explicit_fp32")
    assert wa.attention_path(cpu, torch.float32) == "explicit_fp32"
    with pytest.raises(ValueError):
        forced_path("flash")


@pytest.mark.parametrize("path", wa.PATHS)
def test_window_attention_paths_agree_with_a_broadcast_mask(forced_path, path):
    torch.manual_seed(0)
    batch, windows, heads, n, dim = 3, 4, 2, 16, 8
    q, k, v = (torch.randn(batch * windows, heads, n, dim) for _ in range(3))
    bias = torch.randn(heads, n, n)
    mask = torch.where(torch.rand(windows, n, n) > 0.7, -100.0, 0.0)
    expected = torch.softmax(q @ k.transpose(-2, -1) * dim ** -0.5 + bias
                             + mask.repeat(batch, 1, 1)[:, None], dim=-1) @ v
    forced_path(path)
    torch.testing.assert_close(wa.window_attention(q, k, v, bias, mask), expected, rtol=1e-5, atol=1e-5)


def _mixmim_encoder(mask_attention: bool = True):
    from mim_lightning.models.backbones.mixmim import mixmim_from_spec

    torch.manual_seed(0)
    # 128 px: 4 windows per stage in stages 1-3, each holding tokens of both images (32 px mask units)
    return mixmim_from_spec(SWIN, 128, window_size=[16, 8, 4, 4], mask_attention=mask_attention).eval()


@pytest.mark.parametrize("path", [None, *wa.PATHS])
@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_mixmae_same_image_restriction_is_exact_in_bf16(forced_path, path, mode):
    """Sample 0 holds image 0 where the mask is False and image 1 where it is True. Its image-0 tokens may
    not attend to image 1's: changing image 1 leaves their encoder output bit-identical, in bf16 too."""
    forced_path(path)
    encoder = _mixmim_encoder()
    if mode == "bf16_weights":
        encoder = encoder.bfloat16()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 128, 128, generator=generator)
    changed = images.clone()
    changed[1] = 10 * torch.randn(3, 128, 128, generator=generator)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, ::2, ::2] = mask[0, 1::2, 1::2] = True  # a checkerboard: every window holds both images
    own = ~mask.reshape(-1)

    def encode(x):
        if mode == "bf16_weights":
            return encoder(x.bfloat16(), mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(x, mask)

    with torch.no_grad():
        before, after = encode(images), encode(changed)
    assert before.dtype == torch.bfloat16
    assert torch.equal(before[0, own], after[0, own])
    assert not torch.equal(before[0, ~own], after[0, ~own])  # the other image's tokens did change


def test_the_same_image_check_can_fail_without_the_restriction():
    encoder = _mixmim_encoder(mask_attention=False)
    images = torch.randn(2, 3, 128, 128)
    changed = images.clone()
    changed[1] += 1.0
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, ::2, ::2] = mask[0, 1::2, 1::2] = True
    with torch.no_grad():
        before, after = encoder(images, mask), encoder(changed, mask)
    own = ~mask.reshape(-1)
    assert not torch.equal(before[0, own], after[0, own])


# ------------------------------------------------------------------------------------ no needless work
def _models():
    from mim_lightning.methods.itpn.model import ITPNPixel
    from mim_lightning.methods.mae.model import MaskedAutoencoder
    from mim_lightning.methods.mixmae.model import MixMAE
    from mim_lightning.methods.simmim.model import SimMIM

    vit = dict(family="vit", patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
    hivit = dict(family="hivit", patch_size=16, embed_dim=32, depth=1, mlp_depth=[1, 1], num_heads=2, mlp_ratio=2.0,
                 bridge_mlp_ratio=2.0)
    return {
        "mae": (lambda: MaskedAutoencoder(vit, img_size=32, decoder_dim=32, decoder_depth=1, decoder_heads=2), 32),
        "mixmae": (lambda: MixMAE(SWIN, img_size=64, window_size=[4, 4, 4, 2], decoder_dim=32, decoder_depth=1,
                                  decoder_heads=2), 64),
        "itpn": (lambda: ITPNPixel(hivit, img_size=64, fpn_dim=16, decoder_dim=32, decoder_depth=1, decoder_heads=2), 64),
        "simmim": (lambda: SimMIM(SWIN, img_size=64, window_size=4, mask_unit=16), 64),
    }


@pytest.mark.parametrize("name", ["mae", "mixmae", "itpn", "simmim"])
def test_the_training_step_makes_no_display_image(name, monkeypatch):
    """Forward + backward never un-normalises or un-patchifies: ``unpatchify`` is not called until ``pred`` is read."""
    import mim_lightning.losses as losses

    calls = []
    original = losses.unpatchify
    monkeypatch.setattr(losses, "unpatchify", lambda *a, **k: calls.append(1) or original(*a, **k))
    factory, size = _models()[name]
    model = factory()
    out = model(torch.randn(2, 3, size, size))
    out.loss.backward()
    assert not out.pred_ready and calls == []
    pred = out.pred
    assert out.pred_ready and pred.shape == (2, 3, size, size) and pred.dtype == torch.float32
    assert out.pred is pred  # made once
    assert calls == ([] if name == "simmim" else [1])


def test_mim_output_pred_stays_a_plain_attribute_for_users():
    patches = torch.randn(2, 4, 3 * 4 * 4)
    out = MIMOutput(loss=torch.tensor(1.0), pred=PatchPixels(patches, 4, (2, 2)), mask=torch.zeros(2, 2, 2))
    from mim_lightning.losses import unpatchify

    torch.testing.assert_close(out.pred, unpatchify(patches, 4, (2, 2), 3))
    out.pred = torch.zeros(2, 3, 8, 8, dtype=torch.bfloat16)
    assert out.pred.dtype == torch.float32 and out.losses == {} and out.latent is None
    assert MIMOutput(torch.tensor(0.0), torch.ones(1, 3, 2, 2), torch.ones(1)).pred.shape == (1, 3, 2, 2)
