"""LoRAN layers (seed 004): LoRA whose update passes through a non-linear activation.

Each target nn.Linear (W0: out x in) becomes

    y = W0·x + (α / r0) · ΔW·dropout(x),     ΔW = f(B·A),     f(u) = u + A_amp·u·sin(ω·u)

with f applied elementwise to the matrix B·A (the "Sin" activation), B (out x r0) zero-initialised
and A (r0 x r1) Kaiming-uniform (a = √5, as LoRA's A), so training starts at the base model
(f(0) = 0). ``r`` is the seed's list ``[r0, r1, ...]``: in the released config ``r=[64, 4096]``
the second number is the layer's in_features, not a rank. With ``use_P`` the update is a small
chain instead: for i = 1..L-1, M ← f(M)·P_i (+ b_i), P_i (r_i x r_{i+1}) with r_L = in_features,
so r1.. are free; ``use_b`` adds a bias row b_i (size r_{i+1}, zero-initialised) after each step.
Without P every entry after r0 must equal in_features (0 stands for "this layer's in_features").
The seed's code zero-initialises the last P as well as B, which leaves both without a gradient
(their product is the update): here the last P is Kaiming-initialised like the others, and B = 0
alone keeps the start at the base model. Only the "Sin" activation is implemented (the released
config's; the others, e.g. Sigmoid, have f(0) != 0).

ΔW does not depend on x, so ``merge`` folds it exactly: W = W0 + (α / r0)·ΔW.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from methods.adapter_layers import find_linears, fold_wrappers, plain_copy, train_only, wrap_linears, wrapper_parameter_names
from stages.core.errors import fail

import torch
from torch import nn
from torch.nn import functional as F

KIND = "loran"
CONFIG_KEYS = ("r", "alpha", "dropout", "A_amp", "omega", "use_P", "use_b", "target_modules", "layers_to_transform")


def sin_activation(u: torch.Tensor, amplitude: float, omega: float) -> torch.Tensor:
    """f(u) = u + A·u·sin(ω·u), elementwise."""
    return u + amplitude * u * torch.sin(omega * u)


class LoRANLinear(nn.Module):
    """A frozen nn.Linear plus the LoRAN update (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, ranks: list[int], alpha: float, dropout: float,
                 amplitude: float, omega: float, use_P: bool, use_b: bool):
        super().__init__()
        self.base_layer = base_layer
        self.ranks, self.amplitude, self.omega = list(ranks), float(amplitude), float(omega)
        self.scaling = alpha / ranks[0]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        like = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        out_features, in_features = base_layer.out_features, base_layer.in_features
        self.loran_B = nn.Parameter(torch.zeros(out_features, ranks[0], **like))
        self.loran_A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(ranks[0], ranks[1], **like), a=math.sqrt(5)))
        widths = ranks[1:] + [in_features]  # M has r_i columns before step i, r_{i+1} after (r_L = in)
        steps = len(ranks) - 1
        self.loran_P = nn.ParameterList(
            nn.Parameter(nn.init.kaiming_uniform_(torch.empty(widths[i], widths[i + 1], **like), a=math.sqrt(5)))
            for i in range(steps)) if use_P else None
        self.loran_b = nn.ParameterList(
            nn.Parameter(torch.zeros(widths[i + 1], **like)) for i in range(steps)) if use_b else None

    def update(self) -> torch.Tensor:
        """ΔW (out x in), before the α / r0 scaling."""
        m = self.loran_B @ self.loran_A
        for i in range(len(self.ranks) - 1):
            m = sin_activation(m, self.amplitude, self.omega)
            if self.loran_P is not None:
                m = m @ self.loran_P[i]
            if self.loran_b is not None:
                m = m + self.loran_b[i]
        return m

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.update()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(self.dropout(x), self.delta_weight().to(x.dtype))

    def extra_repr(self) -> str:
        return f"r={self.ranks}, scaling={self.scaling:g}, A_amp={self.amplitude:g}, omega={self.omega:g}"


# ----------------------------------------------------------------------------- configuration

def config_from(cfg: SimpleNamespace) -> dict:
    """The JSON-able adapter config from a method script's settings, checked."""
    config = {key: getattr(cfg, key) for key in CONFIG_KEYS}
    return check_config(config)


def check_config(config: dict) -> dict:
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        fail(f"LoRAN config lacks {', '.join(missing)}: expected keys {', '.join(CONFIG_KEYS)}")
    r = config["r"] if isinstance(config["r"], list) else [config["r"], 0]
    if len(r) < 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in r) or r[0] < 1 or min(r[1:]) < 0:
        fail(f"--r {' '.join(map(str, r))} is not valid: expected the rank and then the layer's in_features "
             f"(the seed's r=[64, 4096]; 0 = each layer's own in_features), e.g. --r 8 576")
    if config["alpha"] <= 0:
        fail(f"--alpha must be positive, got {config['alpha']}")
    if not 0 <= config["dropout"] < 1:
        fail(f"--dropout must be in [0, 1), got {config['dropout']}")
    if config["A_amp"] < 0:
        fail(f"--A_amp must be >= 0, got {config['A_amp']}")
    try:
        layers = [int(v) for v in config["layers_to_transform"] or []]
    except (TypeError, ValueError):
        fail(f"--layers_to_transform {config['layers_to_transform']} is not valid: expected layer indices (none = every layer)")
    return {**config, "r": list(r), "target_modules": list(config["target_modules"]), "layers_to_transform": layers,
            "alpha": float(config["alpha"]), "dropout": float(config["dropout"]), "A_amp": float(config["A_amp"]),
            "omega": float(config["omega"]), "use_P": bool(config["use_P"]), "use_b": bool(config["use_b"])}


def layer_ranks(config: dict, name: str, linear: nn.Linear) -> list[int]:
    """``r`` for one layer: 0 entries become its in_features; without P, r1.. must be in_features."""
    in_features = linear.in_features
    ranks = [config["r"][0]] + [v or in_features for v in config["r"][1:]]
    if not config["use_P"] and any(v != in_features for v in ranks[1:]):
        fail(f"--r {' '.join(map(str, config['r']))}: without --use_P every entry after the rank must be the layer's "
             f"in_features ({name} has {in_features}); give 0 for each layer's own, or --use_P")
    return ranks


# ----------------------------------------------------------------------------- the kind's hooks

def attach(model: nn.Module, config: dict) -> nn.Module:
    """Wrap the target linear layers of a plain transformers model; only LoRAN's tensors train."""
    config = check_config(dict(config))
    found = find_linears(model, config["target_modules"], config["layers_to_transform"])
    ranks = {name: layer_ranks(config, name, linear) for name, linear in found}  # every layer checked before any is wrapped
    wrap_linears(model, found, lambda name, linear: LoRANLinear(
        linear, ranks[name], config["alpha"], config["dropout"], config["A_amp"], config["omega"],
        config["use_P"], config["use_b"]))
    train_only(model, adapter_names(model))
    model.adaptlab_adapter = {"kind": KIND, "config": config}
    return model


def adapter_names(model: nn.Module) -> set[str]:
    """The tensors an exported LoRAN adapter holds."""
    return wrapper_parameter_names(model, (LoRANLinear,))


def merge(model: nn.Module) -> nn.Module:
    """A plain transformers copy of ``model`` with W0 + (α / r0)·f(BA) in every wrapped layer;
    ``model`` itself is left untouched."""
    return fold_wrappers(plain_copy(model), (LoRANLinear,))
