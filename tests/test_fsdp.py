"""trainer=fsdp: FSDP2 through Lightning's ModelParallelStrategy, on 2 CPU processes (gloo, fp32).

The 2-process runs are two ``torch.distributed.run`` launches of ``tests/fsdp_worker.py`` (each rank runs
several fits in one process group; see that file), made once per module: MAE under FSDP2, stopped at step 3
and resumed, and under DDP; then MixMAE (with activation checkpointing), iTPN-CLIP and finetuning with layer
decay and EMA from the MAE run's sharded folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mim_lightning import ConfigError, compose

from conftest import REPO, write_images
from test_scripts import load_script


def launch(scenario: str, out: Path, images: Path, classes: Path, *extra: str) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(REPO / "tests" / "fsdp_worker.py"), scenario, str(out), str(images),
         str(classes), *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads((out / f"{scenario}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    write_images(root / "images", 24, seed=1)
    for label, name in enumerate(["cat", "dog", "emu"]):
        write_images(root / "classes" / name, 6, seed=10 + label, prefix=name)
    mae = launch("mae", root / "out", root / "images", root / "classes")
    others = launch("others", root / "out", root / "images", root / "classes",
                    str(root / "out" / "fsdp" / "checkpoints" / "last.ckpt"))
    return root / "out", mae, others


def sharded_state(folder: Path) -> dict:
    from mim_lightning.checkpoints.sharded import load_sharded

    return load_sharded(folder)["state_dict"]


# ------------------------------------------------------------------------------- 2-process runs


def test_fsdp2_pretrains_mae_with_the_ddp_groups_and_lr(runs):
    out, mae, _ = runs
    assert mae["fsdp_steps"] == mae["ddp_steps"] == 4
    assert mae["fsdp_groups"] == mae["ddp_groups"]  # weight-decay groups by name, decided before sharding
    assert mae["lr"] == mae["ddp_lr"] == pytest.approx(0.05 * 8 / 256)  # 4 per device x 2 data-parallel ranks


def test_sharded_checkpoints_are_complete_folders_kept_by_retention(runs):
    from mim_lightning.callbacks.checkpoint import last_checkpoint
    from mim_lightning.checkpoints.io import checkpoint_problem

    out, _, _ = runs
    folder = out / "fsdp" / "checkpoints"
    # a snapshot every step with keep_last_k=1: steps 1-3 were pruned; no temporary folder is left
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step00000004.ckpt"]
    last = folder / "last.ckpt"
    assert last.is_dir() and {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in last.iterdir()}
    assert checkpoint_problem(last) is None and last_checkpoint(folder) is not None
    (last / ".metadata").rename(last / "x")
    assert "incomplete" in checkpoint_problem(last)
    (last / "x").rename(last / ".metadata")


def test_stopped_and_resumed_fsdp2_run_is_bit_identical_to_an_uninterrupted_one(runs):
    out, mae, _ = runs
    assert mae["stopped_steps"] == 3 and mae["resumed_steps"] == 4
    straight, resumed = sharded_state(out / "fsdp" / "checkpoints" / "last.ckpt"), \
        sharded_state(out / "resumed" / "checkpoints" / "last.ckpt")
    assert sorted(straight) == sorted(resumed)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_encoder_exported_from_the_sharded_folder_equals_the_ddp_runs(runs, tmp_path):
    """fp32 on the CPU: FSDP2's all-gathered forward and reduce-scattered (averaged) gradients give the same
    bits as DDP's all-reduce for 2 ranks (halving is exact), and AdamW is elementwise on the shards."""
    from safetensors.torch import load_file

    from mim_lightning.export import main

    out, _, _ = runs
    main([f"ckpt={out / 'fsdp' / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'fsdp.safetensors'}"])
    main([f"ckpt={out / 'ddp' / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'ddp.safetensors'}"])
    sharded, ddp = load_file(str(tmp_path / "fsdp.safetensors")), load_file(str(tmp_path / "ddp.safetensors"))
    assert sorted(sharded) == sorted(ddp) and "blocks.0.attn.qkv.weight" in sharded
    for key in ddp:
        assert torch.equal(sharded[key], ddp[key]), key


def test_mixmae_itpn_clip_and_finetuning_with_ema_train_under_fsdp2(runs):
    out, _, others = runs
    assert others["mixmae_steps"] == 2 and others["itpn_clip_steps"] == 2 and others["finetune_steps"] == 2
    assert others["simmim_steps"] == 2 and others["itpn_steps"] == 2
    # the frozen CLIP teacher is neither sharded nor optimized, and not in the checkpoint
    assert others["teacher_params_sharded"] is False and others["teacher_in_optimizer"] is False
    clip = sharded_state(out / "itpn_clip" / "checkpoints" / "last.ckpt")
    assert clip and not any("teacher" in key for key in clip)
    # layer decay 0.65 over vit_test's depth: head 1, last block 0.65, embeddings 0.65^2
    assert others["finetune_lr_scales"] == pytest.approx([0.65 ** 2, 0.65, 1.0])
    # the EMA is kept per shard and saved in the shards; training ends with the average in the model
    from mim_lightning.checkpoints.sharded import load_sharded

    final = load_sharded(out / "finetune" / "checkpoints" / "last.ckpt", keys=("state_dict", "ema_state_dict"))
    ema = final["ema_state_dict"]
    assert ema and all(torch.equal(ema[k], final["state_dict"][k]) for k in ema)


# ------------------------------------------------------------------------------- in-process


def test_every_block_of_every_method_is_a_unit_and_frozen_blocks_are_not(tmp_path):
    from hydra.utils import instantiate

    from mim_lightning import build_pretrain_module
    from mim_lightning.config import group_options
    from mim_lightning.parallel import FSDP2Strategy, block_types, shard_units
    from test_config import TINY_FAMILY, method_families

    cfg = compose("pretrain", ["trainer=fsdp", f"run_dir={tmp_path}"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and cfg.trainer.precision == "bf16-mixed"
    assert not strategy.activation_checkpointing and not strategy.cpu_offload
    switched = compose("pretrain", ["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"])
    assert instantiate(switched.trainer.strategy).activation_checkpointing
    types = block_types()
    for method in group_options("method"):
        for family in method_families(method):
            overrides, size = TINY_FAMILY[family]
            model = build_pretrain_module(compose("pretrain", [f"method={method}", *overrides, f"data.image_size={size}",
                                                               f"run_dir={tmp_path}"])).model
            units = shard_units(model)
            trainable = [m for m in model.modules() if isinstance(m, types) and any(p.requires_grad for p in m.parameters())]
            assert units and len(units) == len(trainable), f"{method}/{family}"
            assert not any(name.startswith("teacher.") for name, _ in units), method  # iTPN-CLIP's frozen teacher


def test_fsdp2_config_errors_are_one_line():
    from mim_lightning.parallel import FSDP2Strategy

    with pytest.raises(ConfigError, match="trainer.strategy.mixed_precision"):
        FSDP2Strategy(mixed_precision="fp8")
    with pytest.raises(ConfigError, match="trainer.strategy.data_parallel_size"):
        FSDP2Strategy(data_parallel_size=0)


def test_interrupted_sharded_saves_are_cleaned_and_a_replaced_folder_is_put_back(tmp_path):
    from mim_lightning.checkpoints.io import remove_temp_files
    from mim_lightning.parallel import replace_path

    (tmp_path / "last.ckpt").mkdir()
    (tmp_path / "last.ckpt" / "meta.pt").write_bytes(b"old")
    new = tmp_path / ".last.ckpt.abcd1234.tmp"
    new.mkdir()
    (new / "meta.pt").write_bytes(b"new")
    replace_path(new, tmp_path / "last.ckpt", "abcd1234")
    assert (tmp_path / "last.ckpt" / "meta.pt").read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    # a save killed mid-write: its temporary folder is removed, the checkpoint stays
    (tmp_path / ".last.ckpt.0000aaaa.tmp").mkdir()
    (tmp_path / ".last.ckpt.0000aaaa.tmp" / "__0_0.distcp").write_bytes(b"x" * 10)
    # killed between the two renames: the old folder is put back under its name
    os.replace(tmp_path / "last.ckpt", tmp_path / ".last.ckpt.1111bbbb.old")
    removed = remove_temp_files(tmp_path)
    assert [p.name for p, _ in removed] == [".last.ckpt.0000aaaa.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"] and (tmp_path / "last.ckpt" / "meta.pt").read_bytes() == b"new"


def test_the_legacy_fsdp1_config_is_kept_with_its_limits():
    cfg = compose("pretrain", ["trainer=fsdp1"])
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.FSDPStrategy"
    assert "LEGACY" in (REPO / "conf" / "trainer" / "fsdp1.yaml").read_text()


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_script("gpu_check").main(["--out", str(tmp_path)]) == 0
    assert "no GPU" in capsys.readouterr().out and "no GPU" in (tmp_path / "report.md").read_text()
