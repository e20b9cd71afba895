"""Probes on every labelled source: `callbacks=probes` logs probe/knn_top1 for class folders, labelled shards,
a labelled `datasets.Dataset` saved to disk and Fashion-MNIST, through `DataModule.probe_datasets()`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mim_lightning import build_datamodule, compose, pretrain

from conftest import tiny_overrides
from test_probes import colour_folder
from test_scripts import load_script


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("colours"), per_class=8)


def data_args(kind: str, colours: Path, tmp_path: Path, fashion: Path) -> list[str]:
    if kind == "imagefolder":
        return ["data=imagefolder", f"data.root={colours}"]
    if kind == "shards":
        out = tmp_path / "shards"
        assert load_script("make_shards").main([str(colours), str(out), "--labels", "--maxcount", "10"]) == 0
        return ["data=webdataset", f"data.source.urls={out}"]
    if kind == "hf":
        datasets = pytest.importorskip("datasets")
        paths = sorted(str(p) for p in colours.rglob("*.png"))
        names = sorted({Path(p).parent.name for p in paths})
        table = datasets.Dataset.from_dict({"image": paths, "label": [names.index(Path(p).parent.name) for p in paths]})
        table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
        return ["data=hf", f"data.source.path={tmp_path / 'hf'}", "data.source.label_column=label"]
    return ["data=fashion_mnist", f"data.source.raw_dir={fashion}", f"data.source.cache_dir={tmp_path / 'fm'}"]


@pytest.mark.parametrize("kind", ["imagefolder", "shards", "hf", "fashion_mnist"])
def test_probes_log_knn_top1_on_every_labelled_source(kind, colours, tmp_path, fashion_mnist_raw):
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, *data_args(kind, colours, tmp_path, fashion_mnist_raw), "callbacks=probes",
                          "logger=csv", "data.val_fraction=0.25", "data.repeat=1", "~callbacks.reconstructions")
    cfg = compose("pretrain", args)
    module = build_datamodule(cfg)
    train, held_out = module.probe_datasets(max_train=5, max_held_out=3)
    assert len(train) == 5 and len(held_out) == 3 and "label" in train[(0, 0)] and "mask" not in train[(0, 0)]
    pretrain(cfg)
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    top1 = [float(r["probe/knn_top1"]) for r in rows if r.get("probe/knn_top1")]
    assert top1 and 0.0 <= top1[-1] <= 1.0
    assert any(r.get("probe/linear_train_top1") for r in rows)
