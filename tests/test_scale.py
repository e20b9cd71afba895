"""Scaling out: tar-shard data (data=webdataset through wids, scripts/make_shards.py), Hugging Face datasets
(data=hf), both on the folder path (same split, seeding, rank split, resume), and the FSDP trainer config."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from mim_lightning import ConfigError, build_datamodule, compose
from mim_lightning.data import PretrainDataModule, ShardSource
from mim_lightning.data.datasets import ImageDataset
from mim_lightning.data.shards import INDEX, resolve_shards
from mim_lightning.data.sources import ImageFolderSource

from conftest import REPO, tiny_overrides, write_images
from test_scripts import load_script


def make_shards(folder: Path, out: Path, *args: str) -> int:
    return load_script("make_shards").main([str(folder), str(out), *args])


@pytest.fixture
def shards(tmp_path, image_folder) -> Path:
    """The 24-image folder as 4 shards of 6, in sorted file order (index i = i-th sorted file)."""
    out = tmp_path / "shards"
    assert make_shards(image_folder, out, "--maxcount", "6", "--no-shuffle") == 0
    return out


def shard_module(urls, **kwargs) -> PretrainDataModule:
    defaults = dict(image_size=32, batch_size=3, num_workers=0, seed=3, val_fraction=0.0)
    defaults.update(kwargs)
    module = PretrainDataModule(ShardSource(urls=urls if isinstance(urls, list) else str(urls)), **defaults)
    module.setup("fit")
    return module


def epoch_indices(module: PretrainDataModule, epoch: int = 0, rank: int = 0, world: int = 2) -> list[list[int]]:
    loader = module.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [batch["index"].tolist() for batch in loader]


# ------------------------------------------------------------------------------------------ shards


def test_make_shards_writes_webdataset_shards_and_a_wids_index(tmp_path, class_folder):
    (class_folder / "cat" / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    assert make_shards(class_folder, out, "--maxcount", "5", "--labels") == 0
    index = json.loads((out / INDEX).read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["classes"] == ["cat", "dog", "emu"]
    assert [e["nsamples"] for e in index["shardlist"]] == [5, 5, 5, 3]  # the broken file is left out
    with tarfile.open(out / "shard-000000.tar") as archive:
        names = archive.getnames()
    assert sorted(names[:2]) == ["000000000.cls", "000000000.png"]
    assert make_shards(tmp_path / "missing", tmp_path / "x") == 2


def test_shard_locations_index_folder_brace_patterns_and_missing_shards(shards):
    from_index, _ = resolve_shards(str(shards))
    assert [e["nsamples"] for e in from_index] == [6, 6, 6, 6]
    pattern, _ = resolve_shards(f"{shards}/shard-{{000000..000003}}.tar")  # no index: counted by wids
    assert [e["url"] for e in pattern] == [e["url"] for e in from_index] and [e["nsamples"] for e in pattern] == [6] * 4
    assert len(resolve_shards(f"{shards}/shard-000000.tar::file://{shards}/shard-000003.tar")[0]) == 2
    with pytest.raises(ConfigError, match="data.source.urls"):
        resolve_shards(f"{shards}/shard-{{000000..000009}}.tar")
    with pytest.raises(ConfigError, match="data.source.urls"):
        resolve_shards(None)
    with pytest.raises(ConfigError, match="data.source.urls"):
        resolve_shards(["https://example.invalid/shard-000000.tar"])  # remote without an index


def test_shards_written_by_plain_tarfile_read_the_same(tmp_path, image_folder, shards):
    """A tar made with Python's tarfile (no index, members as img2dataset or `tar` write them)."""
    files = ImageFolderSource(str(image_folder)).samples()
    plain = tmp_path / "plain"
    plain.mkdir()
    for number, start in enumerate(range(0, 24, 6)):
        with tarfile.open(plain / f"part-{number}.tar", "w") as archive:
            for offset, sample in enumerate(files[start: start + 6]):
                archive.add(sample.path, arcname=f"s{start + offset:05d}{Path(sample.path).suffix}")
    a, b = shard_module(plain), shard_module(shards)
    for key in [(0, 0), (7, 1), (23, 2)]:
        assert torch.equal(a.train_dataset[key]["images"], b.train_dataset[key]["images"])


def test_shard_samples_get_the_same_crops_and_masks_as_folder_data(shards, image_folder):
    """The same dataset code, the same (seed, epoch, index) seeding: sample i of the shards is file i of the folder."""
    cfg = compose("pretrain", ["data=webdataset", f"data.source.urls={shards}", "data.image_size=32", "data.seed=3",
                               "data.batch_size=4", "data.num_workers=0", "data.val_fraction=0"])
    module = build_datamodule(cfg)
    module.setup("fit")
    folder = ImageDataset(ImageFolderSource(str(image_folder)).samples(), module.train_transform, seed=3)
    for key in [(0, 0), (7, 0), (13, 2), (23, 1)]:
        a, b = module.train_dataset[key], folder[key]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["mask"], b["mask"]) and a["index"] == b["index"]
    grid = 32 // cfg.backbone.patch_size
    assert a["mask"].shape == (grid, grid)
    # The held-out split is the folder rule's (val_min_images etc.).
    with_val = build_datamodule(compose("pretrain", ["data=webdataset", f"data.source.urls={shards}", "data.image_size=32",
                                                     "data.batch_size=2", "data.num_workers=0"]))
    with_val.setup("fit")
    assert len(with_val.val_dataset) == 8 and len(with_val.train_dataset) == 16


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_reads_every_sample_once_in_a_new_seeded_order(shards, workers):
    module = shard_module(shards, num_workers=workers, persistent_workers=False)
    first = epoch_indices(module)
    assert len(first) == 8
    assert sorted(i for batch in first for i in batch) == list(range(24))
    assert epoch_indices(module) == first  # deterministic
    second = epoch_indices(module, epoch=1)
    assert sorted(i for batch in second for i in batch) == list(range(24)) and second != first


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_continues_with_the_same_batches(shards, workers):
    module = shard_module(shards, num_workers=workers, persistent_workers=False)
    straight = list(module.train_dataloader())
    for done in (1, 3, 4):
        resumed = shard_module(shards, num_workers=workers, persistent_workers=False)
        resumed.load_state_dict({"train_loader": {"epoch": 0, "batches_done": done, "batch_size": 3}})
        rest = list(resumed.train_dataloader())
        assert len(rest) == 8 - done
        for a, b in zip(rest, straight[done:]):
            assert a["index"].tolist() == b["index"].tolist() and torch.equal(a["images"], b["images"])


def test_training_resumed_mid_epoch_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, shards):
    from mim_lightning import pretrain

    def args(run_dir, *extra):
        return tiny_overrides(run_dir, "data=webdataset", f"data.source.urls={shards}", "data.batch_size=3",
                              "data.num_workers=2", "data.val_fraction=0", "data.repeat=1", "~callbacks.reconstructions",
                              "trainer.max_epochs=2", "callbacks.checkpoint.every_n_train_steps=3", *extra)

    straight = pretrain(compose("pretrain", args(tmp_path / "straight")))
    assert straight.num_training_batches == 8 and straight.global_step == 16
    ckpt = tmp_path / "straight" / "checkpoints" / "step00000012.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 1 and saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 4
    resumed = pretrain(compose("pretrain", args(tmp_path / "resumed", f"ckpt_path={ckpt}")))
    assert resumed.global_step == 16
    a, b = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_samples_are_replaced_and_counted(tmp_path, workers):
    folder = tmp_path / "some_bad"
    write_images(folder, 8, seed=5)
    out = tmp_path / "bad_shards"
    assert make_shards(folder, out, "--maxcount", "4", "--no-shuffle") == 0
    # Corrupt one image inside shard 0 (same size, so the tar and its index stay valid).
    with tarfile.open(out / "shard-000000.tar") as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(out / "shard-000000.tar", "w") as archive:
        for i, (member, data) in enumerate(members):
            archive.addfile(member, __import__("io").BytesIO(b"x" * len(data) if i == 1 else data))
    module = shard_module(out, batch_size=2, num_workers=workers, persistent_workers=False)
    if workers == 0:
        with pytest.warns(UserWarning, match="unreadable image sample 1 of"):
            indices = sorted(i for batch in epoch_indices(module) for i in batch)
    else:  # the warning is raised in a worker process; the count is shared with the main one
        indices = sorted(i for batch in epoch_indices(module) for i in batch)
    assert indices == list(range(8)) and module.num_skipped() == 1


def test_webdataset_config_errors_name_the_key(tmp_path, shards):
    with pytest.raises(ConfigError, match="data.source.urls"):
        build_datamodule(compose("pretrain", ["data=webdataset", f"data.source.urls={tmp_path / 'nope'}"])).setup("fit")
    with pytest.raises(ConfigError, match="data.batch_size"):
        build_datamodule(compose("pretrain", ["data=webdataset", f"data.source.urls={shards}",
                                              "data.batch_size=64"])).setup("fit")


def _ddp_indices(tmp_path, *data) -> list[list[int]]:
    record = tmp_path / "seen"
    overrides = [o for o in tiny_overrides(tmp_path / "run") if not o.startswith(("data.repeat", "data.batch_size"))]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "mim_lightning.train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.precision=32-true", *overrides, *data, "data.batch_size=3", "data.val_fraction=0",
         "data.repeat=1", "data.num_workers=0", "data.image_size=32", "~callbacks.reconstructions",
         "+callbacks.record._target_=conftest.RecordIndices", f"+callbacks.record.path={record}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ddp_processes_see_disjoint_samples_whose_union_is_the_epoch(tmp_path, shards):
    """trainer=ddp on 2 CPU processes over 4 shards of 6: each rank trains on 12 samples, none shared."""
    seen = _ddp_indices(tmp_path, "data=webdataset", f"data.source.urls={shards}")
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(24))


@pytest.mark.slow  # two torchrun agents, ~15-25 s on 2 cores; `make test-all` runs it
def test_two_nodes_launched_by_torchrun_split_the_shards_and_count_both_nodes(tmp_path, shards):
    """The multi-node recipe on one machine: two torchrun agents (--nnodes 2, one process each) with
    trainer.num_nodes=2; the effective batch and lr count both nodes, and the nodes read disjoint samples."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    record = tmp_path / "seen"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    overrides = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
                 "trainer.precision=32-true", "backbone=vit_test", "data=webdataset", f"data.source.urls={shards}",
                 "data.batch_size=3", "data.repeat=1", "data.val_fraction=0", "data.num_workers=0", "data.image_size=32",
                 "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
                 "~callbacks.reconstructions", "+callbacks.record._target_=conftest.RecordIndices",
                 f"+callbacks.record.path={record}", f"run_dir={tmp_path / 'run'}"]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                                "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                                "-m", "mim_lightning.train", *overrides],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for node in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "effective batch 6 = 3 per device x 2 devices" in outputs[0]
    seen = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 12 and sorted(seen[0] + seen[1]) == list(range(24))


# ------------------------------------------------------------------------------------------- hf


@pytest.fixture
def hf_dataset(tmp_path, class_folder) -> Path:
    datasets = pytest.importorskip("datasets")
    source_paths = sorted(str(p) for p in class_folder.rglob("*.png"))
    labels = [["cat", "dog", "emu"].index(Path(p).parent.name) for p in source_paths]
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["cat", "dog", "emu"])})
    table = datasets.Dataset.from_dict({"img": source_paths, "y": labels}, features=features)
    table.save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "hf_paths.json").write_text(json.dumps(source_paths))
    return tmp_path / "hf"


def test_hf_dataset_from_disk_feeds_the_folder_pipeline(hf_dataset):
    cfg = compose("pretrain", ["data=hf", f"data.source.path={hf_dataset}", "data.source.image_column=img",
                               "data.source.label_column=y", "data.image_size=32", "data.batch_size=4",
                               "data.num_workers=0", "data.val_fraction=0.2", "data.repeat=1"])
    module = build_datamodule(cfg)
    module.setup("fit")
    assert module.classes == ["cat", "dog", "emu"] and module.labelled
    assert len(module.train_dataset) + len(module.val_dataset) == 18
    paths = json.loads((hf_dataset.parent / "hf_paths.json").read_text())
    sample = module.train_dataset.samples[0]
    item = module.train_dataset[(0, 1)]
    folder = ImageDataset([type(sample)(paths[int(sample.path)], sample.label)], module.train_transform, seed=cfg.seed)
    expected = folder[(0, 1)]
    assert torch.equal(item["images"], expected["images"]) and torch.equal(item["mask"], expected["mask"])
    assert item["label"] == sample.label == ["cat", "dog", "emu"].index(Path(paths[int(sample.path)]).parent.name)
    batch = next(iter(module.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["mask"].shape[0] == 4 and batch["label"].shape == (4,)


def test_hf_rows_resume_mid_epoch_through_the_folder_loader(hf_dataset):
    def module():
        return build_datamodule(compose("pretrain", [
            "data=hf", f"data.source.path={hf_dataset}", "data.source.image_column=img", "data.image_size=32",
            "data.batch_size=3", "data.num_workers=0", "data.val_fraction=0", "data.repeat=1"]))

    straight = list(module().train_dataloader())
    resumed = module()
    resumed.load_state_dict({"train_loader": {"epoch": 0, "batches_done": 2, "batch_size": 3}})
    rest = list(resumed.train_dataloader())
    assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in straight[2:]]
    assert torch.equal(rest[0]["images"], straight[2]["images"])


def test_hf_streaming_splits_rows_over_ranks(hf_dataset):
    """Streaming, 2 ranks, 18 rows, epoch_size 18: each rank streams 9 different rows (told apart by a
    row-id column read as the label) and yields the same number of batches."""
    datasets = pytest.importorskip("datasets")
    table = datasets.load_from_disk(str(hf_dataset))
    table.add_column("row", list(range(len(table)))).save_to_disk(str(hf_dataset.parent / "with_rows"))
    seen = []
    for rank in range(2):
        cfg = compose("pretrain", ["data=hf", f"data.source.path={hf_dataset.parent / 'with_rows'}",
                                   "data.source.image_column=img", "data.source.label_column=row", "data.image_size=32",
                                   "data.batch_size=3", "data.num_workers=0", "data.source.streaming=true",
                                   "data.source.epoch_size=18", "data.source.shuffle_buffer=4"])
        module = build_datamodule(cfg)
        module.setup("fit")
        module._rank_and_world = lambda rank=rank: (rank, 2)
        loader = module.train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader) == 3 and batches[0]["images"].shape == (3, 3, 32, 32)
        seen.append([row for b in batches for row in b["label"].tolist()])
        assert module.describe()["images"] is None and module.probe_datasets() is None
    assert len(seen[0]) == len(seen[1]) == 9 and sorted(seen[0] + seen[1]) == list(range(18))
    with pytest.raises(ConfigError, match="data.source.epoch_size"):
        build_datamodule(compose("pretrain", ["data=hf", f"data.source.path={hf_dataset}", "data.source.streaming=true"]))


def test_hf_config_errors_name_the_key(hf_dataset, tmp_path):
    with pytest.raises(ConfigError, match="data.source.image_column"):
        build_datamodule(compose("pretrain", ["data=hf", f"data.source.path={hf_dataset}"])).setup("fit")
    with pytest.raises(ConfigError, match="data.source.path"):
        build_datamodule(compose("pretrain", ["data=hf", f"data.source.path={tmp_path / 'nothing_here'}"])).setup("fit")


# ------------------------------------------------------------------------------------------- fsdp


def test_fsdp_wraps_one_unit_per_block_of_every_method(tmp_path):
    from hydra.utils import instantiate

    from mim_lightning import build_pretrain_module
    from mim_lightning.config import group_options
    from test_config import TINY_FAMILY, method_families

    cfg = compose("pretrain", ["trainer=fsdp1", f"run_dir={tmp_path}"])  # the legacy FSDP1 config (tests/test_fsdp.py: FSDP2)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy.state_dict_type == "sharded"
    strategy = instantiate(cfg.trainer.strategy)
    classes = tuple(strategy.kwargs["auto_wrap_policy"]._module_classes)
    for method in group_options("method"):
        for family in method_families(method):
            overrides, size = TINY_FAMILY[family]
            model = build_pretrain_module(compose("pretrain", [f"method={method}", *overrides, f"data.image_size={size}",
                                                               f"run_dir={tmp_path}"])).model
            wrapped = [m for m in model.modules() if isinstance(m, classes)]
            assert wrapped, f"{method}/{family}: no FSDP unit"
    switched = compose("pretrain", ["trainer=fsdp1",
                                    "+trainer.strategy.activation_checkpointing_policy=${trainer.strategy.auto_wrap_policy}"])
    assert instantiate(switched.trainer.strategy)._activation_checkpointing_kwargs


def test_fsdp_on_cpu_is_a_one_line_config_error(tmp_path):
    from mim_lightning.api import build_trainer

    cfg = compose("pretrain", ["trainer=fsdp1", "trainer.accelerator=cpu", "trainer.devices=1", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="requires a GPU"):
        build_trainer(cfg)


def test_slurm_sweeps_use_the_submitit_launcher_with_all_nodes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = subprocess.run(
        [sys.executable, "-m", "mim_lightning.train", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=4",
         "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_node=8", "trainer=ddp", "trainer.devices=8",
         "trainer.num_nodes=4", f"run_dir={tmp_path}", "--cfg", "hydra"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SlurmLauncher" in result.stdout and "nodes: 4" in result.stdout and "tasks_per_node: 8" in result.stdout
