import torch

from mim_lightning.losses import denormalize_patches, masked_mse, normalize_patches, patchify, unpatchify


def test_patchify_layout_is_row_col_channel():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    # patch (0, 1) of sample 0, first pixel (p=0, q=0), channels 0..2
    assert patches[0, 1, :3].tolist() == [images[0, c, 0, 2].item() for c in range(3)]
    # second pixel in the same patch row (q=1)
    assert patches[0, 1, 3:6].tolist() == [images[0, c, 0, 3].item() for c in range(3)]


def test_unpatchify_inverts_patchify_on_rectangular_images():
    images = torch.randn(3, 3, 16, 24)
    assert torch.equal(unpatchify(patchify(images, 8), 8, (2, 3)), images)


def test_norm_pix_target_is_per_patch_with_unbiased_variance():
    patches = torch.randn(2, 5, 48) * 3 + 1
    normalized, mean, var = normalize_patches(patches)
    for b in range(2):
        for i in range(5):
            x = patches[b, i]
            expected = (x - x.mean()) / torch.sqrt(x.var(unbiased=True) + 1e-6)
            torch.testing.assert_close(normalized[b, i], expected)
    torch.testing.assert_close(denormalize_patches(normalized, mean, var), patches)
    # each normalized patch has (unbiased) unit variance
    torch.testing.assert_close(normalized.var(-1), torch.ones(2, 5), atol=1e-4, rtol=0)


def test_masked_mse_ignores_visible_patches():
    pred, target = torch.randn(2, 6, 12), torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    loss = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[~mask] = 1000.0
    assert torch.equal(masked_mse(changed, target, mask), loss)
    expected = ((pred - target) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, expected)
