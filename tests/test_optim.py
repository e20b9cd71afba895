import math

import pytest
import torch
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.optim import param_groups, scaled_lr, warmup_cosine_factor


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4), requires_grad=False)
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def test_official_mae_rule_decays_tokens_but_not_biases_norms_or_frozen():
    groups = param_groups(Toy(), 0.05)
    model = Toy()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05)
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert decayed == {"cls_token", "linear.weight"}  # 3-D tokens ARE decayed in the official code
    assert plain == {"linear.bias", "norm.weight", "norm.bias"}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0


def test_unknown_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="method.no_weight_decay='nope'"):
        param_groups(Toy(), 0.05, rule="nope")


def test_lr_scaling_rule():
    assert scaled_lr(1.5e-4, 4096, 256) == pytest.approx(2.4e-3)
    assert scaled_lr(5e-4, 2048, 512) == pytest.approx(2e-3)


def test_warmup_then_half_cycle_cosine():
    f = lambda s: warmup_cosine_factor(s, warmup_steps=10, total_steps=110, min_factor=0.1)  # noqa: E731
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_start_factor():
    assert warmup_cosine_factor(0, 4, 10, warmup_start_factor=0.25) == 0.25
    assert warmup_cosine_factor(2, 4, 10, warmup_start_factor=0.25) == pytest.approx(0.625)
    assert math.isclose(warmup_cosine_factor(4, 4, 10), 1.0)


def test_skip_keys_add_to_the_rule():
    model = Toy()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05, skip=["cls_token"])
    assert {names[id(p)] for p in groups[0]["params"]} == {"linear.weight"}


def test_warmup_then_multistep():
    from mim_lightning.optim import warmup_multistep_factor

    f = lambda s: warmup_multistep_factor(s, warmup_steps=4, milestones=[10, 20], gamma=0.1, warmup_start_factor=0.5)  # noqa: E731
    assert [f(0), f(2), f(4), f(9)] == [0.5, 0.75, 1.0, 1.0]
    assert f(10) == pytest.approx(0.1) and f(25) == pytest.approx(0.01)


def test_cosine_over_the_absolute_step_as_timm_without_warmup_prefix():
    f = lambda s: warmup_cosine_factor(s, warmup_steps=10, total_steps=100, cosine_from_start=True)  # noqa: E731
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert f(100) == pytest.approx(0.0)


def test_decay_groups_survive_wrapping_and_flattening():
    """FSDP flattens parameters to 1-D and adds name segments: decisions taken before wrapping hold."""
    from mim_lightning.optim import no_decay_names

    model = Toy()
    exempt = no_decay_names(model)
    wrapper = torch.nn.Module()
    wrapper._fsdp_wrapped_module = model
    with torch.no_grad():
        model.linear.weight = nn.Parameter(model.linear.weight.reshape(-1))  # flattened, as FSDP does
    names = {id(p): n for n, p in wrapper.named_parameters()}
    groups = param_groups(wrapper, 0.05, exempt=exempt)
    assert {names[id(p)] for p in groups[0]["params"]} == {"_fsdp_wrapped_module.cls_token",
                                                          "_fsdp_wrapped_module.linear.weight"}


def test_layer_decay_groups_survive_wrapping_and_flattening():
    from mim_lightning.optim import layer_decay_param_groups

    model = Toy()
    one_dim = {n for n, p in model.named_parameters() if p.ndim <= 1}
    wrapper = torch.nn.Module()
    wrapper._fsdp_wrapped_module = model
    with torch.no_grad():
        model.linear.weight = nn.Parameter(model.linear.weight.reshape(-1))
    layer = {"cls_token": 0, "linear.weight": 1, "linear.bias": 1, "norm.weight": 2, "norm.bias": 2}
    groups = layer_decay_param_groups(wrapper, 0.05, 0.5, layer.__getitem__, num_layers=2, one_dim=one_dim)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert decayed == {"_fsdp_wrapped_module.cls_token", "_fsdp_wrapped_module.linear.weight"}
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales == {0: 0.25, 1: 0.5, 2: 1.0}
