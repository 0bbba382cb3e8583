"""What the adapter kinds peft does not carry (methods/loran.py, methods/loretta.py)
share: finding the target linear layers, wrapping them, freezing the rest, and folding the
wrappers back into plain ``nn.Linear`` s on a copy of the model.

A wrapper is an ``nn.Module`` holding the original layer as ``base_layer`` (its tensors keep
their names under ``<name>.base_layer.``) and, if its update is linear in x, a
``delta_weight()`` (out x in) with ``wrapper(x) == base_layer(x) + x·delta_weightᵀ`` in eval mode.
The model carries ``adaptlab_adapter = {"kind", "config"}``: what export saves.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence

from stages.core.errors import fail

import torch
from torch import nn

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The transformer block a module belongs to ('model.layers.3.self_attn.q_proj' -> 3)."""
    found = LAYER_INDEX.search(module_name)
    return int(found.group(1)) if found else None


def block_path(module_name: str) -> str:
    """A module's name inside its transformer block ('bert.encoder.layer.3.attention.output.dense'
    -> 'attention.output.dense'); the whole name outside any block."""
    found = LAYER_INDEX.search(module_name)
    return module_name[found.end():] if found else module_name


def find_linears(model: nn.Module, targets: Sequence[str], layers: Sequence[int] | None = None,
                 flag: str = "target_modules") -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules whose last name component is in ``targets`` (as peft matches
    target_modules), or, for a target with dots, whose path inside its block is the target (BERT's
    'attention.output.dense' vs the FFN's 'output.dense'); restricted to blocks ``layers`` when
    given; none found is an error naming the linear layers the model has."""
    if not targets:
        fail(f"--{flag} is empty: expected names of linear layers such as q_proj v_proj")
    wanted = set(targets)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and (name.rsplit(".", 1)[-1] in wanted or block_path(name) in wanted)
             and (not layers or layer_index(name) in set(layers))]
    if not found:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        where = f" in layers {list(layers)}" if layers else ""
        fail(f"--{flag} {' '.join(targets)} matched no linear layer{where}: the model's linear layers are {', '.join(linear)}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrap_linears(model: nn.Module, found: list[tuple[str, nn.Linear]], make: Callable[[str, nn.Linear], nn.Module]) -> None:
    for name, linear in found:
        replace_module(model, name, make(name, linear))


def train_only(model: nn.Module, names: set[str]) -> None:
    """requires_grad on exactly ``names``: the base model is frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def wrapper_parameter_names(model: nn.Module, wrapper_types: tuple[type, ...]) -> set[str]:
    """Names of the wrappers' own tensors (everything but their base layers)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, wrapper_types):
            names |= {f"{module_name}.{n}" for n, _ in module.named_parameters() if not n.startswith("base_layer.")}
    return names


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with the class's own forward: accelerate wraps ``forward`` in autocast for
    mixed-precision training, and scoring (like the evaluate stage) runs in full precision."""
    clone = copy.deepcopy(model)
    clone.__dict__.pop("forward", None)
    clone.__dict__.pop("_original_forward", None)
    return clone


@torch.no_grad()
def fold_wrappers(model: nn.Module, wrapper_types: tuple[type, ...]) -> nn.Module:
    """Replace every wrapper in ``model`` (in place) by an nn.Linear holding W0 + delta_weight()."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, wrapper_types)]
    for name, wrapper in wrapped:
        base = wrapper.base_layer
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        linear.weight.copy_(base.weight + wrapper.delta_weight().to(base.weight.dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        linear.requires_grad_(False)
        replace_module(model, name, linear)
    model.__dict__.pop("adaptlab_adapter", None)
    return model
