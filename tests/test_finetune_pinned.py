"""Pinned finetuning numerics: logits and the optimizer's parameter groups of every method's classifier.

The constants were computed by the code *before* the method-spec refactor (issue #16). Classifiers are built
from ``conf/finetune.yaml`` with the tiny test backbones, seeded, in both modes; the logits on fixed images must
stay equal, and so must every parameter's (lr scale, weight decay) except the two weight-decay fixes of #16
(MixMAE decays its relative position bias tables as the official finetuning; iTPN-pixel does not decay
``absolute_pos_embed``), which are listed in ``CHANGED`` and checked separately.

    PYTHONPATH=. python tests/test_finetune_pinned.py   # prints the current values
"""

from __future__ import annotations

import hashlib

import pytest
import torch

CASES = {
    "mae": ["method=mae", "backbone=vit_test", "data.image_size=32"],
    "simmim_swin": ["method=simmim", "backbone=swin_test", "data.image_size=64"],
    "simmim_vit": ["method=simmim", "backbone=vit_test", "data.image_size=32", "finetune.linear_probe.block=1"],
    "mixmae": ["method=mixmae", "backbone=swin_test", "data.image_size=64", "finetune.classifier.window_size=[4,4,4,2]"],
    "itpn": ["method=itpn", "backbone=hivit_test", "data.image_size=64"],
    "itpn_clip": ["method=itpn_clip", "backbone=hivit_test", "data.image_size=64"],
}

#: (sum of logits, sum of |logits|, digest of the (name, lr_scale, weight_decay) list) per case and mode.
PINNED: dict[str, tuple[float, float, str]] = {
    "itpn/finetune": (0.00017722273332765326, 0.0012054813996655867, 'e3214098ae49a6db'),
    "itpn/linear_probe": (0.08861135970801115, 0.6027403576299548, 'eda35d5393c9e80a'),
    "itpn_clip/finetune": (0.1652847658842802, 1.208101598545909, '091a579d3f56f88d'),
    "itpn_clip/linear_probe": (0.08264236245304346, 0.6040505031123757, 'eda35d5393c9e80a'),
    "mae/finetune": (0.00020174585915810894, 0.0009307372474722797, '61e792f5a3ee060f'),
    "mae/linear_probe": (0.42271410301327705, 0.7413356862962246, 'eda35d5393c9e80a'),
    "mixmae/finetune": (-0.0001400655983161414, 0.0018400877797830617, 'ae808f42d816e1cb'),
    "mixmae/linear_probe": (-0.07003279682248831, 0.9200434545055032, 'eda35d5393c9e80a'),
    "simmim_swin/finetune": (0.5205707401037216, 1.0567858219146729, 'fe45a4310223479b'),
    "simmim_swin/linear_probe": (0.2602852303534746, 0.5283926483243704, '635428900f41a6d0'),
    "simmim_vit/finetune": (-7.613404159201309e-05, 0.001025281242618803, '9b829b23991378bb'),
    "simmim_vit/linear_probe": (0.003905249759554863, 0.0586593933403492, 'eda35d5393c9e80a'),
}

#: Parameters whose weight decay #16 changed on purpose: case -> {name substring: new decay}.
CHANGED = {"mixmae": {"relative_position_bias_table": 0.05}, "itpn": {"absolute_pos_embed": 0.0}}


def build(case: str, mode: str):
    from mim_lightning import build_finetune_module, compose

    torch.manual_seed(0)
    cfg = compose("finetune", [*CASES[case], f"mode={mode}", "num_classes=7", "data.batch_size=4"])
    return build_finetune_module(cfg, num_classes=7)


def groups(module, changed: dict[str, float] | None = None) -> list[tuple[str, float, float]]:
    """(name, lr_scale, weight_decay) of every trainable parameter, with the #16 changes undone when given."""
    names = {id(p): n for n, p in module.model.named_parameters()}
    rows = []
    for group in module.param_groups(1.0):
        for p in group["params"]:
            name = names[id(p)]
            decay = float(group["weight_decay"])
            for key, new in (changed or {}).items():
                if key in name and decay == new:
                    decay = 0.0 if new else 0.05  # the value before the fix
            rows.append((name, round(float(group["lr_scale"]), 10), decay))
    return sorted(rows)


def digest(rows) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def current(case: str, mode: str, undo_changes: bool = True) -> tuple[float, float, str]:
    module = build(case, mode).eval()
    size = 32 if CASES[case][1] == "backbone=vit_test" else 64
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = module.model(images).double()
    rows = groups(module, CHANGED.get(case) if undo_changes else None)
    return float(logits.sum()), float(logits.abs().sum()), digest(rows)


@pytest.mark.parametrize("mode", ["finetune", "linear_probe"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_classifier_logits_and_param_groups_are_unchanged(case, mode, one_thread):
    total, absolute, groups_digest = current(case, mode)
    want_total, want_abs, want_digest = PINNED[f"{case}/{mode}"]
    assert total == pytest.approx(want_total, rel=1e-5, abs=1e-10)
    assert absolute == pytest.approx(want_abs, rel=1e-5)
    assert groups_digest == want_digest


@pytest.mark.parametrize("case", sorted(CHANGED))
def test_the_two_weight_decay_fixes_follow_the_official_finetuning(case, one_thread):
    """MixMAE: ``models_mixmim_ft.py`` ``no_weight_decay()`` is empty, so the 2-D relative position bias tables are
    decayed; iTPN: ``models_itpn.py`` ``no_weight_decay()`` is ``{'absolute_pos_embed'}``."""
    rows = groups(build(case, "finetune"))
    for key, decay in CHANGED[case].items():
        hits = [row for row in rows if key in row[0]]
        assert hits and all(row[2] == decay for row in hits), (key, hits)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for case in sorted(CASES):
        for mode in ("finetune", "linear_probe"):
            print(f'    "{case}/{mode}": {current(case, mode, undo_changes=False)},')
