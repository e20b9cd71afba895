"""The study's runs and files: the image folders it validates on, the results file, and one run of each kind
(pretraining, finetune / probe, kNN), each through ``mim_lightning.api`` like a user's run."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path


def link_subset(folder: Path, samples: list) -> Path:
    """``folder`` as class folders of symlinks to ``samples``, marked complete once every link is written."""
    for sample in samples:
        link = folder / Path(sample.path).parent.name / Path(sample.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(sample.path)
    (folder / ".complete").write_text("done\n")
    return folder


def test_folder(work_dir: Path, raw_dir: str, test_images: int | None) -> Path:
    """The test split's class folders, or a class-balanced subset of symlinks to them (``--quick``)."""
    from mim_lightning.data.fashion_mnist import export_split, stratified_subset
    from mim_lightning.data.sources import ClassFolderSource

    full = export_split(raw_dir, "test")
    if test_images is None:
        return full
    subset = work_dir / f"test_{test_images}"
    if (subset / ".complete").is_file():
        return subset
    samples = ClassFolderSource(str(full)).samples()
    return link_subset(subset, stratified_subset(samples, min(1.0, test_images / len(samples)), seed=0))


def labelled_samples(raw_dir: str, labelled_fraction: float) -> list:
    """The labelled subset every finetune and probe trains on (``data.source.fraction``)."""
    from mim_lightning.data.fashion_mnist import FashionMNISTSource

    return FashionMNISTSource(raw_dir=raw_dir, fraction=labelled_fraction).samples()


def labelled_folder(work_dir: Path, raw_dir: str, labelled_fraction: float) -> Path:
    """The labelled subset as class folders of symlinks: the kNN bank (read with the evaluation transform)."""
    folder = work_dir / f"labelled_{labelled_fraction:g}"
    if (folder / ".complete").is_file():
        return folder
    return link_subset(folder, labelled_samples(raw_dir, labelled_fraction))


def heldout_folder(work_dir: Path, raw_dir: str, labelled_fraction: float, images: int) -> Path:
    """A class-stratified slice of the train split outside the labelled subset (symlinks): the budget selection's
    validation set, so that the test split is never used to choose."""
    from mim_lightning.data.fashion_mnist import export_split, stratified_subset
    from mim_lightning.data.sources import ClassFolderSource

    folder = work_dir / f"heldout_{labelled_fraction:g}_{images}"
    if (folder / ".complete").is_file():
        return folder
    labelled = {s.path for s in labelled_samples(raw_dir, labelled_fraction)} if labelled_fraction < 1 else set()
    rest = [s for s in ClassFolderSource(str(export_split(raw_dir, "train"))).samples() if s.path not in labelled]
    if not rest:
        raise SystemExit("the labelled subset is the whole train split: no images are left for a held-out slice")
    return link_subset(folder, stratified_subset(rest, min(1.0, images / len(rest)), seed=1))


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_pretrain(overrides: list[str]) -> tuple[Path, float | None]:
    """Pretrain; returns ``last.ckpt`` and the mean training loss of the last epoch's logged steps (None when
    the CSV log has none), the number that says whether a run left a plateau."""
    from mim_lightning.api import checkpoint_dir, pretrain
    from mim_lightning.config import compose

    cfg = compose("pretrain", overrides)
    pretrain(cfg)
    ckpt = checkpoint_dir(cfg) / "last.ckpt"
    if not ckpt.is_file():
        raise RuntimeError(f"pretraining wrote no {ckpt}")
    return ckpt, last_epoch_loss(Path(cfg.run_dir) / "csv" / "metrics.csv")


def last_epoch_loss(metrics_csv: Path) -> float | None:
    """Mean ``train/loss`` over the rows of the last epoch in a Lightning CSV log."""
    import csv

    if not metrics_csv.is_file():
        return None
    rows = [(int(row["epoch"]), float(row["train/loss"])) for row in csv.DictReader(metrics_csv.open())
            if row.get("train/loss") and row.get("epoch")]
    if not rows:
        return None
    last = max(epoch for epoch, _ in rows)
    losses = [loss for epoch, loss in rows if epoch == last and math.isfinite(loss)]
    return round(sum(losses) / len(losses), 4) if losses else None


def epoch_snapshots(checkpoints: Path) -> dict[int, Path]:
    """The pretraining run's epoch-end snapshots by the number of epochs trained (``epoch000.ckpt``, written
    when the first epoch ends, is 1)."""
    found = {}
    for path in checkpoints.glob("epoch*.ckpt"):
        match = re.fullmatch(r"epoch(\d+)\.ckpt", path.name)
        if match:
            found[int(match.group(1)) + 1] = path
    return found


def run_downstream(overrides: list[str]) -> float:
    from mim_lightning.api import finetune
    from mim_lightning.config import compose

    cfg = compose("finetune", overrides)
    trainer = finetune(cfg)
    top1 = trainer.callback_metrics.get("finetune/val_top1")
    if top1 is None:
        raise RuntimeError("the run logged no finetune/val_top1")
    return float(top1) * 100.0


def run_knn(overrides: list[str], bank_root: Path, query_root: Path, seed: int, k: int = 20,
            temperature: float = 0.07) -> float:
    """kNN top-1 (%) of the linear probe's features: the classifier of a ``mode=linear_probe`` run (its
    ``pretrained`` encoder, or the seeded random initialisation with ``pretrained=null``), the input of its probe
    head as the feature, the images of ``bank_root`` as the bank and those of ``query_root`` as the queries, both
    with the evaluation transform (resize + centre crop). Weighted vote as in DINO (``callbacks.probes.knn_top1``)."""
    import lightning.pytorch as pl
    import torch

    from mim_lightning.api import build_finetune_datamodule, build_finetune_module
    from mim_lightning.callbacks.probes import knn_top1
    from mim_lightning.config import compose

    base = [o for o in overrides if not o.startswith("val_root=")]
    pl.seed_everything(seed, verbose=False)
    cfg = compose("finetune", [*base, f"val_root={query_root}"])
    module = build_finetune_module(cfg, num_classes=10)
    model = module.model.eval()
    captured: list[torch.Tensor] = []
    hook = module.classifier.head.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))

    def features(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
        datamodule = build_finetune_datamodule(compose("finetune", [*base, f"val_root={root}"]))
        datamodule.setup("fit")
        rows, labels = [], []
        with torch.no_grad():
            for batch in datamodule.val_dataloader():
                captured.clear()
                model(batch["images"])
                keep = batch["valid"].bool() if "valid" in batch else torch.ones(len(batch["label"]), dtype=torch.bool)
                rows.append(captured[0].float()[keep])
                labels.append(batch["label"][keep])
        return torch.cat(rows), torch.cat(labels)

    try:
        bank, bank_labels = features(bank_root)
        queries, query_labels = features(query_root)
    finally:
        hook.remove()
    return 100.0 * knn_top1(bank, bank_labels, queries, query_labels, k=k, temperature=temperature, num_classes=10)


def count_parameters(method, extra: list[str]) -> int:
    from mim_lightning.api import build_finetune_module
    from mim_lightning.config import compose

    cfg = compose("finetune", [f"method={method.name}", *method.backbone, "data=fashion_mnist", *method.finetune,
                               *extra])
    module = build_finetune_module(cfg, num_classes=10)
    return sum(p.numel() for p in module.model.parameters())
