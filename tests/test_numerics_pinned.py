"""Pinned numerics: loss and gradient norm of every pretraining model on fixed weights, masks and images.

The constants were computed by the code *before* the speed work of issue #19 (attention paths, lazy display
image) on the CPU in fp32 with one thread. A faster path must give the same loss and gradients: equal within
1e-5 relative. Tiny models, but with the structure that matters: Swin with shifted windows and several
windows per stage, MixMAE with several windows per stage and the same-image restriction, MAE/iTPN dropping
hidden units.

    PYTHONPATH=. python tests/test_numerics_pinned.py   # prints the current values
"""

from __future__ import annotations

import math

import pytest
import torch

SWIN = dict(family="swin", patch_size=4, embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 2, 4, 8], mlp_ratio=2.0)
VIT = dict(family="vit", patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
HIVIT = dict(family="hivit", patch_size=16, embed_dim=32, depth=2, mlp_depth=[1, 1], num_heads=2, mlp_ratio=2.0,
             bridge_mlp_ratio=2.0)

#: (loss, gradient norm, sum of |pred|) per case, from the unchanged code (commit 8b7ea4a; ``mixmae_128`` was
#: added afterwards, its values computed by a checkout of 8b7ea4a).
PINNED = {
    "mae": (1.2862637042999268, 0.6877308096695579, 3905.1155894321855),
    "mae_pixels": (1.2883963584899902, 0.6824892577933007, 3865.75726366408),
    "simmim_swin": (0.9188017249107361, 0.5052750010970259, 17062.816747021978),
    "simmim_vit": (0.9043830037117004, 1.6175888226790773, 4209.2866692342795),
    "mixmae": (1.0215576887130737, 0.06260574307070958, 5856.6030871048715),
    "mixmae_128": (1.0214195251464844, 0.041704823201946684, 22693.49704210728),
    "mixmae_no_mask_attention": (1.0215510129928589, 0.06249486640252739, 5857.335153429667),
    "itpn": (1.0115426778793335, 0.077465097140452, 3515.2461256395327),
}


def _hidden(batch: int, length: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(length, generator=generator) < count for _ in range(batch)]
    return torch.stack(rows)


def build(case: str):
    """(model, images, mask) for ``case``, all from fixed seeds."""
    from mim_lightning.methods.itpn.model import ITPNPixel
    from mim_lightning.methods.mae.model import MaskedAutoencoder
    from mim_lightning.methods.mixmae.model import MixMAE
    from mim_lightning.methods.simmim.model import SimMIM

    torch.manual_seed(0)
    if case == "mae":
        model = MaskedAutoencoder(VIT, img_size=32, decoder_dim=32, decoder_depth=2, decoder_heads=2)
        size, mask = 32, _hidden(3, 16, 12, 1).reshape(3, 4, 4)
    elif case == "mae_pixels":
        model = MaskedAutoencoder(VIT, img_size=32, norm_pix_loss=False, decoder_dim=32, decoder_depth=1, decoder_heads=2)
        size, mask = 32, _hidden(3, 16, 12, 2).reshape(3, 4, 4)
    elif case == "simmim_swin":
        model = SimMIM(SWIN, img_size=64, window_size=4, mask_unit=16)
        units = _hidden(3, 16, 10, 3).reshape(3, 4, 4)
        size, mask = 64, units.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (3, 16, 16) on the 4px grid
    elif case == "simmim_vit":
        model = SimMIM(VIT, img_size=32, mask_unit=16, drop_path_rate=0.0)
        units = _hidden(3, 4, 2, 4).reshape(3, 2, 2)
        size, mask = 32, units.repeat_interleave(2, 1).repeat_interleave(2, 2)
    elif case == "mixmae_128":  # 4 windows per stage that each hold tokens of both images
        model = MixMAE(SWIN, img_size=128, window_size=[16, 8, 4, 4], decoder_dim=32, decoder_depth=1, decoder_heads=2)
        size, mask = 128, _hidden(1, 16, 8, 6).reshape(1, 4, 4)
    elif case in ("mixmae", "mixmae_no_mask_attention"):
        model = MixMAE(SWIN, img_size=64, window_size=[4, 4, 4, 2], decoder_dim=32, decoder_depth=1, decoder_heads=2,
                       mask_attention=case == "mixmae")
        size, mask = 64, torch.tensor([[[True, False], [False, True]]])
    elif case == "itpn":
        model = ITPNPixel(HIVIT, img_size=64, fpn_dim=16, decoder_dim=32, decoder_depth=1, decoder_heads=2)
        size, mask = 64, _hidden(3, 16, 12, 5).reshape(3, 4, 4)
    else:
        raise KeyError(case)
    batch = 4 if case.startswith("mixmae") else 3
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))
    return model, images, mask


def loss_and_grad_norm(case: str) -> tuple[float, float, float]:
    """(loss, gradient norm over all parameters, sum of |pred|) for ``case``."""
    model, images, mask = build(case)
    model.eval()  # no stochastic depth anywhere
    out = model(images, mask)
    out.loss.backward()
    squares = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return float(out.loss.detach()), math.sqrt(squares), float(out.pred.detach().double().abs().sum())


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.mark.parametrize("case", sorted(PINNED))
def test_loss_and_gradient_norm_are_pinned(case):
    loss, grad_norm, pred = loss_and_grad_norm(case)
    expected_loss, expected_norm, expected_pred = PINNED[case]
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=0)
    assert grad_norm == pytest.approx(expected_norm, rel=1e-5, abs=0)
    assert pred == pytest.approx(expected_pred, rel=1e-5, abs=0)  # the display image, however it is made


@pytest.mark.parametrize("path", ["sdpa", "explicit", "explicit_fp32"])
@pytest.mark.parametrize("case", ["simmim_swin", "mixmae", "mixmae_128"])
def test_every_window_attention_path_keeps_the_pinned_numerics(case, path):
    """The automatic choice per device and dtype may pick any path: each one gives the pinned values."""
    from mim_lightning.models.backbones.window_attention import set_attention_path

    previous = set_attention_path(path)
    try:
        loss, grad_norm, pred = loss_and_grad_norm(case)
    finally:
        set_attention_path(previous)
    expected_loss, expected_norm, expected_pred = PINNED[case]
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=0)
    assert grad_norm == pytest.approx(expected_norm, rel=1e-5, abs=0)
    assert pred == pytest.approx(expected_pred, rel=1e-5, abs=0)


CASES = ("mae", "mae_pixels", "simmim_swin", "simmim_vit", "mixmae", "mixmae_128", "mixmae_no_mask_attention", "itpn")


def test_every_case_is_pinned():
    assert set(PINNED) == set(CASES)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in CASES:
        print(f'    "{name}": {loss_and_grad_norm(name)!r},')
