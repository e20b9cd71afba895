"""Online probes during pretraining: pooled features of every method, kNN and the online linear probe."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from mim_lightning import build_datamodule, build_pretrain_module, compose
from mim_lightning.api import build_trainer
from mim_lightning.callbacks import KNNProbe, OnlineLinearProbe, RunCheckpoint, SeedPerRank
from mim_lightning.callbacks.probes import knn_top1
from mim_lightning.models.features import pooled_features, register_pooler

COLOURS = {"red": (200, 30, 30), "green": (30, 190, 40), "blue": (40, 50, 210)}


def colour_folder(root: Path, per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """An easy labelled set: one noisy solid colour per class."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("colours"))


def probe_config(root: Path, run_dir: Path, *extra: str):
    # SimMIM's ViT has drop path 0.1 (rates 0 and 0.1 over 2 blocks): the model draws from the global
    # RNG every step, so any random draw by a probe would change the training.
    return compose("pretrain", [
        "method=simmim", "backbone=vit_test", "backbone.depth=2", "data.image_size=32", "mask.unit=16",
        "data=imagefolder", f"data.root={root}", "data.batch_size=6", "data.num_workers=0", "data.val_fraction=0.25",
        "data.repeat=2",
        "trainer=cpu", "logger=csv", "callbacks=probes", f"run_dir={run_dir}", *extra])


class GradRecorder(pl.Callback):
    """Copies of the encoder's gradients just before every optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({name: p.grad.detach().clone() for name, p in pl_module.model.encoder.named_parameters()
                           if p.grad is not None})


def fit(cfg, callbacks: list, max_steps: int, ckpt_path: str | None = None, **trainer_kwargs
        ) -> tuple[pl.LightningModule, GradRecorder]:
    pl.seed_everything(0, verbose=False)
    module = build_pretrain_module(cfg)
    recorder = GradRecorder()
    kwargs = dict(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  num_sanity_val_steps=0, enable_model_summary=False)
    kwargs.update(trainer_kwargs)
    trainer = build_trainer(cfg, callbacks=[SeedPerRank(0), *callbacks, recorder], **kwargs)
    trainer.fit(module, datamodule=build_datamodule(cfg), ckpt_path=ckpt_path)
    return module, recorder


def test_online_linear_probe_leaves_encoder_gradients_identical(colours, tmp_path):
    cfg = probe_config(colours, tmp_path)
    plain, plain_grads = fit(cfg, [], max_steps=4)
    probe = OnlineLinearProbe(lr=0.05)
    probed, probed_grads = fit(cfg, [probe], max_steps=4)
    assert len(plain_grads.grads) == len(probed_grads.grads) == 4
    for step, (a, b) in enumerate(zip(plain_grads.grads, probed_grads.grads)):
        assert a.keys() == b.keys() and a
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step}: {name} differs"
    for (name, p), q in zip(plain.model.named_parameters(), probed.model.parameters()):
        assert torch.equal(p, q), name
    # the probe did train (its own parameters moved away from their seeded init), and no encoder
    # parameter holds a gradient from it
    weight = probe.head[1].weight
    assert weight.grad is not None and weight.abs().sum() > 0
    assert probe.head[0].num_batches_tracked.item() == 4


def test_knn_probe_is_high_on_an_easy_set_and_logged(colours, tmp_path):
    cfg = probe_config(colours, tmp_path, "trainer.log_every_n_steps=1")
    knn = KNNProbe(every_n_steps=3, k=5)
    linear = OnlineLinearProbe(lr=0.05)
    from mim_lightning.api import build_loggers

    fit(cfg, [knn, linear], max_steps=9, logger=build_loggers(cfg))  # 9 steps = one epoch, then validation
    assert knn.enabled and knn.last_top1 is not None and knn.last_top1 >= 0.9
    assert linear.last_top1 is not None and 0.0 <= linear.last_top1 <= 1.0
    import csv

    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    knn_rows = [(int(r["step"]), float(r["probe/knn_top1"])) for r in rows if r.get("probe/knn_top1")]
    assert [s for s, _ in knn_rows] == [3, 6, 9]  # every 3 steps; the end (step 9) is not repeated
    assert any(r.get("probe/linear_top1") for r in rows) and any(r.get("probe/linear_train_top1") for r in rows)


def test_knn_top1_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(40, 8, generator=generator), torch.randn(15, 8, generator=generator)
    bank_labels = torch.randint(0, 3, (40,), generator=generator)
    query_labels = torch.randint(0, 3, (15,), generator=generator)
    cos = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    nearest = bank_labels[cos.argmax(dim=1)]
    expected = (nearest == query_labels).float().mean().item()
    assert knn_top1(bank, bank_labels, queries, query_labels, k=1) == pytest.approx(expected)
    # k = everything with a huge temperature: a plain majority vote over the bank
    majority = torch.bincount(bank_labels).argmax()
    expected = (query_labels == majority).float().mean().item()
    assert knn_top1(bank, bank_labels, queries, query_labels, k=40, temperature=1e6) == pytest.approx(expected)


def test_probes_switch_off_without_labels(image_folder, tmp_path):
    cfg = compose("pretrain", ["backbone=vit_test", "data.image_size=32", "data=folder", f"data.root={image_folder}",
                               "data.batch_size=4", "data.num_workers=0", "trainer=cpu", f"run_dir={tmp_path}"])
    knn, linear = KNNProbe(every_n_steps=1), OnlineLinearProbe()
    with pytest.warns(UserWarning, match="no labels"):
        fit(cfg, [knn, linear], max_steps=2)
    assert not knn.enabled and not linear.enabled and knn.last_top1 is None and linear.head is None


def test_linear_probe_resumes_exactly(colours, tmp_path):
    """The head and its optimizer are in the checkpoint: resuming at step 2 ends as the straight 4-step run.

    One block (no drop path), so that the encoder itself resumes bit-exactly in this in-process harness."""
    cfg = probe_config(colours, tmp_path, "backbone.depth=1")
    straight = OnlineLinearProbe(lr=0.05)
    checkpoints = RunCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="step{step}", auto_insert_metric_name=False,
                                every_n_train_steps=2, save_top_k=-1)
    fit(cfg, [straight, checkpoints], max_steps=4, enable_checkpointing=True)
    resumed = OnlineLinearProbe(lr=0.05)
    fit(cfg, [resumed], max_steps=4, ckpt_path=str(tmp_path / "ckpt" / "step2.ckpt"))
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 4
    for name, value in straight.head.state_dict().items():
        torch.testing.assert_close(resumed.head.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method,backbone,dim", [
    ("mae", "vit_test", 32), ("simmim", "vit_test", 32), ("simmim", "swin_test", 128), ("mixmae", "swin_test", 128),
    ("itpn", "hivit_test", 32), ("itpn_clip", "hivit_test", 32),
])
def test_pooled_features_of_every_method(method, backbone, dim, tmp_path):
    cfg = compose("pretrain", [f"method={method}", f"backbone={backbone}", "data.image_size=64", f"run_dir={tmp_path}"])
    model = build_pretrain_module(cfg).model.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = pooled_features(model, images)
        single = pooled_features(model, images[1:2])
    assert features.shape == (3, dim) and torch.isfinite(features).all()
    torch.testing.assert_close(features[1:2], single, atol=1e-5, rtol=1e-4)  # per image, no batch mixing
    if method == "mae":  # all patches, final norm, mean of the patch tokens (cls with pool="cls")
        with torch.no_grad():
            tokens = model.encoder(images)
            torch.testing.assert_close(features, tokens[:, 1:].mean(1))
            torch.testing.assert_close(pooled_features(model, images, pool="cls"), tokens[:, 0])


def test_pooled_features_unknown_model_and_registration():
    class Plain(torch.nn.Module):
        def forward(self, images):
            return images

    with pytest.raises(TypeError, match="no feature pooling for Plain"):
        pooled_features(Plain(), torch.zeros(1, 3, 8, 8))
    register_pooler(Plain, lambda model, images, pool: images.mean(dim=(2, 3)))
    assert pooled_features(Plain(), torch.ones(2, 3, 8, 8)).shape == (2, 3)
