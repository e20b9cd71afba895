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
    # The quick grid (1 epoch x lr 1e-3, 2e-3) on the held-out slice first, then the chain at the chosen budget.
    assert [r["kind"] for r in records] == ["select", "select", "ceiling", "pretrain", "finetune", "linear_probe",
                                            "scratch"] + ["curve"] * 5
    # The learning curve: probe and kNN after 0 (random init), 1 and 2 pretraining epochs; the probe after the
    # whole (2-epoch) pretraining is the linear_probe run itself.
    assert [(r["at"], r["metric"]) for r in records[7:]] == [(0, "linear_probe"), (0, "knn"), (1, "linear_probe"),
                                                            (1, "knn"), (2, "knn")]
    snapshots = script.epoch_snapshots(work / "seed0" / "mae" / "pretrain" / "checkpoints")
    assert sorted(snapshots) == [1, 2]
    assert records[3]["epochs"] == 2 and records[3]["final_loss"] > 0
    assert [(r["family"], r["epochs"], r["lr"]) for r in records[:2]] == [("vit", 1, 1e-3), ("vit", 1, 2e-3)]
    assert all(0.0 <= r["top1"] <= 100.0 for r in records if "top1" in r)
    chosen = script.select_budget(records, "vit", script.Budget.quick())
    assert {(r["epochs"], r["lr"]) for r in records if r["kind"] in ("finetune", "scratch")} == {chosen}
    # The held-out slice is the train images outside the labelled half: disjoint from it, never the test split.
    heldout = {p.name for p in (work / "heldout_0.5_200").rglob("*.png")}
    labelled = {Path(s.path).name for s in FashionMNISTSource(raw_dir=str(fashion_mnist_raw), fraction=0.5).samples()}
    assert len(heldout) == 30 and not heldout & labelled
    report = (work / "small_scale.md").read_text()
    assert "| MAE |" in report and "| vit (MAE) |" in report and "## Learning curves" in report
    assert (work / "small_scale_curves.png").stat().st_size > 1000
    # A second invocation finds every run done and only rewrites the report.
    assert script.main(["--quick", "--methods", "mae", "--raw-dir", str(fashion_mnist_raw), "--work-dir",
                        str(work), "--labelled-fraction", "0.5", "data.num_workers=0", "data.batch_size=4", "trainer=cpu"]) == 0
    assert len((work / "results.jsonl").read_text().splitlines()) == 12


def test_readme_commands_parse():
    """The README's ``reproduce_small.py`` commands (which the README test does not run) name real flags."""
    script = load_script()
    readme = (REPO / "README.md").read_text()
    commands = [line.split("#")[0].split() for line in readme.splitlines()
                if line.startswith("python scripts/reproduce_small.py")]
    assert len(commands) >= 4
    for words in commands:
        script.build_parser().parse_args(words[2:])  # argparse exits on an unknown flag


def test_budget_selection_picks_the_best_heldout_point_and_breaks_ties_towards_less():
    script = load_script()
    budget = script.Budget(seeds=[0], select_epochs=[10, 30], select_lrs=[1e-3, 2e-3])

    def runs(scores, family="swin"):
        return [dict(kind="select", family=family, epochs=e, lr=lr, top1=t) for (e, lr), t in scores.items()]

    scores = {(10, 1e-3): 80.0, (10, 2e-3): 83.0, (30, 1e-3): 85.0, (30, 2e-3): 84.0}
    assert script.select_budget(runs(scores), "swin", budget) == (30, 1e-3)
    # Other families' runs and the finetune / test results never enter the choice.
    noise = runs({(10, 1e-3): 99.0}, "vit") + [dict(kind="finetune", family="swin", epochs=10, lr=1e-3, top1=99.0)]
    assert script.select_budget(runs(scores) + noise, "swin", budget) == (30, 1e-3)
    tie = {(10, 1e-3): 85.0, (10, 2e-3): 85.0, (30, 1e-3): 85.0, (30, 2e-3): 85.0}
    assert script.select_budget(runs(tie), "swin", budget) == (10, 1e-3)
    with pytest.raises(RuntimeError, match=r"no held-out result"):
        script.select_budget(runs({(10, 1e-3): 80.0}), "swin", budget)
    table = script.selection_table(runs(scores), budget)
    assert "| swin (SimMIM) | 80.0 | 83.0 | **85.0** | 84.0 | 30 epochs, lr 0.001 |" in table


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="needs apt-get install dataset-fashion-mnist")
def test_quick_mode_all_methods(tmp_path):
    result = subprocess.run([sys.executable, "scripts/reproduce_small.py", "--quick", "--work-dir",
                             str(tmp_path / "work")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "work" / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["kind"]) for r in records} == {
        (m, k) for m in ("mae", "simmim", "mixmae", "itpn") for k in ("pretrain", "finetune", "linear_probe", "scratch", "curve")
    } | {(m, k) for m in ("mae", "simmim", "itpn") for k in ("select", "ceiling")}
    assert (tmp_path / "work" / "small_scale.png").is_file()
    assert (tmp_path / "work" / "small_scale_curves.png").is_file()
