"""Fashion-MNIST data and the small-scale reproduction script (scripts/reproduce_small.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mim_lightning.data.fashion_mnist import CLASSES, FashionMNISTSource, read_split
from mim_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_small", REPO / "scripts" / "reproduce_small.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is created
    spec.loader.exec_module(module)
    return module


def test_source_writes_class_folders_with_the_idx_pixels(fashion_mnist_raw, tmp_path):
    source = FashionMNISTSource(raw_dir=str(fashion_mnist_raw), split="test", cache_dir=str(tmp_path / "cache"))
    samples = source.samples()
    images, labels = read_split(fashion_mnist_raw, "test")
    assert len(samples) == 20 and source.classes == list(CLASSES)
    for sample in samples:
        index = int(Path(sample.path).stem)
        assert sample.label == labels[index]
        np.testing.assert_array_equal(np.asarray(Image.open(sample.path)), images[index])


def test_fraction_is_a_class_stratified_fixed_subset(fashion_mnist_raw, tmp_path):
    def subset(seed):
        return FashionMNISTSource(raw_dir=str(fashion_mnist_raw), fraction=0.5, subset_seed=seed,
                                  cache_dir=str(tmp_path / "cache")).samples()

    half = subset(0)
    assert len(half) == 30
    assert np.bincount([s.label for s in half], minlength=10).tolist() == [3] * 10
    assert [s.path for s in half] == [s.path for s in subset(0)]
    assert [s.path for s in half] != [s.path for s in subset(1)]


def test_missing_package_is_a_one_line_error_naming_the_apt_command(tmp_path):
    with pytest.raises(ConfigError, match=r"apt-get install dataset-fashion-mnist"):
        FashionMNISTSource(raw_dir=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "cache")).samples()
    with pytest.raises(ConfigError, match=r"data.source.fraction=0"):
        FashionMNISTSource(fraction=0)
    result = subprocess.run([sys.executable, "-m", "mim_lightning.train", "data=fashion_mnist",
                             f"data.source.raw_dir={tmp_path / 'nowhere'}", f"data.source.cache_dir={tmp_path / 'c'}",
                             f"run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0]


def test_report_table_verdicts_and_readme_block(tmp_path):
    script = load_script()
    methods = [script.METHODS["mae"], script.METHODS["simmim"]]
    results = []
    for seed in range(3):
        results += [dict(method="mae", seed=seed, kind="pretrain", seconds=60.0),
                    dict(method="mae", seed=seed, kind="finetune", top1=85.0 + seed, params=450000, seconds=1.0),
                    dict(method="mae", seed=seed, kind="linear_probe", top1=70.0, seconds=1.0),
                    dict(method="mae", seed=seed, kind="scratch", top1=80.0 + seed, seconds=1.0),
                    dict(method="simmim", seed=seed, kind="finetune", top1=78.0, seconds=1.0),
                    dict(method="simmim", seed=seed, kind="scratch", top1=80.0, seconds=1.0)]
    rows = script.summary_rows(results, methods)
    assert rows[0]["finetune"] == "86.0 ± 1.0" and rows[0]["scratch"] == "81.0 ± 1.0"
    assert rows[0]["beats_scratch"] == "yes (+5.0)" and rows[0]["params"] == "0.45M"
    assert rows[1]["beats_scratch"].startswith("**no**") and rows[1]["linear_probe"] == "–"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{script.README_BEGIN}\nold table\n{script.README_END}\noutro\n")
    budget = script.Budget(seeds=[0, 1, 2])
    doc = script.report(results, methods, budget, "python scripts/reproduce_small.py", 120.0, tmp_path / "docs", readme)
    text = readme.read_text()
    assert "old table" not in text and "| MAE | vit_fmnist |" in text and text.endswith("outro\n")
    assert "(docs/small_scale.md)" in text
    assert "python scripts/reproduce_small.py" in doc.read_text()
    assert (tmp_path / "docs" / "small_scale.png").stat().st_size > 1000


def test_quick_chain_runs_on_a_miniature_package(fashion_mnist_raw, tmp_path):
    """Pretrain -> finetune / probe / scratch for one method through the script (tiny data, CPU)."""
    script = load_script()
    work = tmp_path / "work"
    code = script.main(["--quick", "--methods", "mae", "--raw-dir", str(fashion_mnist_raw), "--work-dir", str(work),
                        "--labelled-fraction", "0.5", "data.num_workers=0", "data.batch_size=4", "trainer=cpu"])
    assert code == 0
    records = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["pretrain", "finetune", "linear_probe", "scratch"]
    assert all(0.0 <= r["top1"] <= 100.0 for r in records[1:])
    assert "| MAE |" in (work / "small_scale.md").read_text()
    # A second invocation finds every run done and only rewrites the report.
    assert script.main(["--quick", "--methods", "mae", "--raw-dir", str(fashion_mnist_raw), "--work-dir",
                        str(work), "--labelled-fraction", "0.5", "data.num_workers=0", "data.batch_size=4", "trainer=cpu"]) == 0
    assert len((work / "results.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="needs apt-get install dataset-fashion-mnist")
def test_quick_mode_all_methods(tmp_path):
    result = subprocess.run([sys.executable, "scripts/reproduce_small.py", "--quick", "--work-dir",
                             str(tmp_path / "work")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "work" / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["kind"]) for r in records} == {
        (m, k) for m in ("mae", "simmim", "mixmae", "itpn") for k in ("pretrain", "finetune", "linear_probe", "scratch")}
    assert (tmp_path / "work" / "small_scale.png").is_file()
