"""LoRETTA layers (seed 003; Yang et al., NAACL 2024): adapters whose matrices are tensor trains.

Every trained matrix is a ``TTMatrix`` (methods/tensor_train.py): reshaped into a tensor over
a factorisation of its output and input dimensions (SmolLM2: 576 -> 8·8·9, 192 -> 12·16,
1536 -> 8·12·16, r = 8 -> 8, bottleneck 64 -> 8·8; set them with ``tt_shapes``) and held as
TT cores of rank ``tt_rank`` (5). Two forms (``tuning_type``):

* ``loretta_rep`` — LoRA with TT-factorised A (r x in) and B (out x r) on ``target_modules``:
      y = W0·x + (α / r)·B·A·dropout(x)
  linear in x, so ``merge`` folds it exactly: W = W0 + (α / r)·B·A.
* ``loretta_adp`` — a bottleneck adapter after attention (o_proj's output) and after the FFN
  (down_proj's output), on ``adapter_modules``:
      h ← h + s·Up(σ(Down(h)))      Down: d -> bottleneck, Up: bottleneck -> d, TT weights + biases
  with every normalisation layer trainable too (the paper's Figure 2). On the encoder table
  (methods/encoder.py) loretta_rep trains the LayerNorms too, as the reference's BERT path does
  (it marks every parameter named "Norm"; on Llama that name matches none, so the decoder's
  loretta_rep leaves the norms frozen, as there). σ is non-linear, so it
  cannot be folded into W: ``merge`` returns the model with the adapters kept (lm-eval scores it
  as it is) and ``foldable`` says so, so stages/merge.py writes base weights + adapter, which
  ``models.load_model`` attaches again.

Initialisation. The paper initialises the factors with reduced noise so that training starts near
the base model; the public code draws both A and B at random. Here A and Down are random (their
dense entries have the variance of LoRA's Kaiming-uniform A), and the LAST core of B and of Up
is zero (Up's bias too), so the model starts exactly at the base model, as LoRA's B = 0.
Placement. The public code puts Llama's first adapter on the MLP's input (gate/up projections);
the paper (and METHODS.md) puts it after attention: here, on o_proj's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

from methods.adapter_layers import find_linears, fold_wrappers, plain_copy, train_only, wrap_linears, wrapper_parameter_names
from methods.tensor_train import TTMatrix, factors_for, parse_shapes
from stages.core.errors import fail
from stages.core.settings import LoraSettings, like, setting

import torch
from torch import nn
from torch.nn import functional as F

KIND = "loretta"
TUNING_TYPES = ("loretta_rep", "loretta_adp")
TRAINERS = ("adam", "zo", "zo_adam")
ZEROTH_ORDER_TRAINERS = ("zo", "zo_adam")
NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
CONFIG_KEYS = ("tuning_type", "tt_rank", "tt_shapes", "r", "lora_alpha", "lora_dropout", "target_modules",
               "bottleneck", "non_linearity", "adapter_scaling", "adapter_modules")


def kaiming_std(fan_in: int) -> float:
    """Standard deviation of Kaiming-uniform(a = √5) init, LoRA's A: U(±1/√fan_in)."""
    return 1.0 / math.sqrt(3.0 * fan_in)


class DenseMatrix(nn.Module):
    """An out x in matrix held as it is (``tt_rank`` 0): the plain bottleneck adapter / LoRA that
    LoRETTA's tensor trains are compared against, with TTMatrix's initialisation and ``full()``."""

    def __init__(self, out_features: int, in_features: int, std: float, zero_last: bool = False, **like):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **like))
        with torch.no_grad():
            self.weight.zero_() if zero_last else self.weight.normal_(0.0, std)

    def full(self) -> torch.Tensor:
        return self.weight


def matrix(out_features: int, in_features: int, tt_rank: int, shapes: dict[int, list[int]], std: float,
           zero_last: bool = False, **like) -> nn.Module:
    """A TT matrix of rank ``tt_rank``, or a dense one for tt_rank 0."""
    if tt_rank == 0:
        return DenseMatrix(out_features, in_features, std, zero_last, **like)
    return TTMatrix(out_features, in_features, factors_for(out_features, shapes), factors_for(in_features, shapes),
                    tt_rank, std=std, zero_last=zero_last, **like)


class TTLoRALinear(nn.Module):
    """loretta_rep: a frozen nn.Linear plus (α / r)·B·A·dropout(x) with A and B tensor trains."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, tt_rank: int,
                 shapes: dict[int, list[int]]):
        super().__init__()
        self.base_layer = base_layer
        like = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        out_features, in_features = base_layer.out_features, base_layer.in_features
        self.lora_A = matrix(r, in_features, tt_rank, shapes, std=kaiming_std(in_features), **like)
        self.lora_B = matrix(out_features, r, tt_rank, shapes, std=kaiming_std(r), zero_last=True, **like)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.full() @ self.lora_A.full())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(self.dropout(x), self.lora_A.full().to(x.dtype))
        return self.base_layer(x) + self.scaling * F.linear(low, self.lora_B.full().to(x.dtype))


class TTAdapterLinear(nn.Module):
    """loretta_adp: a frozen nn.Linear whose output h becomes h + s·Up(σ(Down(h)))."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int, non_linearity: str, scaling: float, tt_rank: int,
                 shapes: dict[int, list[int]]):
        super().__init__()
        self.base_layer = base_layer
        like = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        d = base_layer.out_features
        self.adapter_down = matrix(bottleneck, d, tt_rank, shapes, std=kaiming_std(d), **like)
        self.adapter_down_bias = nn.Parameter(torch.zeros(bottleneck, **like))
        self.adapter_up = matrix(d, bottleneck, tt_rank, shapes, std=kaiming_std(bottleneck), zero_last=True, **like)
        self.adapter_up_bias = nn.Parameter(torch.zeros(d, **like))
        self.non_linearity, self.scaling = non_linearity, float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        down = F.linear(h, self.adapter_down.full().to(h.dtype), self.adapter_down_bias.to(h.dtype))
        up = F.linear(NON_LINEARITIES[self.non_linearity](down), self.adapter_up.full().to(h.dtype), self.adapter_up_bias.to(h.dtype))
        return h + self.scaling * up


# ----------------------------------------------------------------------------- configuration

@dataclass(kw_only=True)
class LorettaLayerSettings:
    """LoRETTA's layers: LoRA with tensor-train A, B (loretta_rep) or tensor-train bottleneck adapters (loretta_adp)."""

    tuning_type: str = setting(help="loretta_rep: LoRA with tensor-train A, B on target_modules; loretta_adp: tensor-train "
                                    "bottleneck adapters on adapter_modules, norms trainable", choices=TUNING_TYPES)
    tt_rank: int = setting(help="inner TT-rank of every tensor train; 0: dense matrices (plain LoRA or Houlsby adapters)")
    tt_shapes: list[str] = setting(help="how a dimension is factorised, DIM:AxBxC (576:8x8x9); any other one "
                                        "automatically, into modes <= 16")
    r: int = like(LoraSettings, "r")
    lora_alpha: int = like(LoraSettings, "lora_alpha")
    lora_dropout: float = like(LoraSettings, "lora_dropout")
    target_modules: list[str] = like(LoraSettings, "target_modules")
    bottleneck: int = setting(help="width of the adapters' bottleneck (loretta_adp)")
    non_linearity: str = setting(help="σ between the adapter's down and up projections (loretta_adp)",
                                 choices=tuple(NON_LINEARITIES))
    adapter_scaling: float = setting(help="s in h <- h + s·Up(σ(Down(h))) (loretta_adp)")
    adapter_modules: list[str] = setting(help="linear layers whose output gets an adapter (loretta_adp)")

    def __post_init__(self):
        check_config({key: getattr(self, key) for key in CONFIG_KEYS})


def config_from(cfg: SimpleNamespace) -> dict:
    """The JSON-able adapter config from a method script's settings, checked."""
    return check_config({key: getattr(cfg, key) for key in CONFIG_KEYS})


def check_config(config: dict) -> dict:
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        fail(f"LoRETTA config lacks {', '.join(missing)}: expected keys {', '.join(CONFIG_KEYS)}")
    if config["tuning_type"] not in TUNING_TYPES:
        fail(f"--tuning_type '{config['tuning_type']}' is not valid: expected one of {', '.join(TUNING_TYPES)}")
    for key in ("tt_rank", "r", "bottleneck"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < (0 if key == "tt_rank" else 1):
            what = "an integer >= 0 (0: dense matrices)" if key == "tt_rank" else "a positive integer"
            fail(f"--{key} must be {what}, got {config[key]!r}")
    if config["non_linearity"] not in NON_LINEARITIES:
        fail(f"--non_linearity '{config['non_linearity']}' is not valid: expected one of {', '.join(NON_LINEARITIES)}")
    if not 0 <= config["lora_dropout"] < 1:
        fail(f"--lora_dropout must be in [0, 1), got {config['lora_dropout']}")
    if config["lora_alpha"] <= 0:
        fail(f"--lora_alpha must be positive, got {config['lora_alpha']}")
    parse_shapes(config["tt_shapes"])  # a bad entry is an error before any layer is built
    return {**config, "tt_shapes": list(config["tt_shapes"] or []), "target_modules": list(config["target_modules"]),
            "adapter_modules": list(config["adapter_modules"]), "lora_alpha": float(config["lora_alpha"]),
            "lora_dropout": float(config["lora_dropout"]), "adapter_scaling": float(config["adapter_scaling"])}


def norm_parameter_names(model: nn.Module) -> set[str]:
    """The tensors of every normalisation layer (LlamaRMSNorm, LayerNorm, ...)."""
    return {f"{module_name}.{n}" if module_name else n
            for module_name, module in model.named_modules() if "norm" in type(module).__name__.lower()
            for n, _ in module.named_parameters(recurse=False)}


def foldable(config: dict) -> bool:
    """Whether ``merge`` folds the adapter into the weights (loretta_rep) or keeps it (loretta_adp)."""
    return config["tuning_type"] == "loretta_rep"


# ----------------------------------------------------------------------------- the kind's hooks

def attach(model: nn.Module, config: dict) -> nn.Module:
    """Add LoRETTA's layers to a plain transformers model; only they (and, for loretta_adp, the
    normalisation layers) train. The config records the factorisation of every dimension used,
    so a reloaded adapter is rebuilt with the very same shapes."""
    config = check_config(dict(config))
    shapes, rank, used = parse_shapes(config["tt_shapes"]), config["tt_rank"], set()
    if config["tuning_type"] == "loretta_rep":
        found = find_linears(model, config["target_modules"])
        for _, linear in found:
            used |= {config["r"], linear.in_features, linear.out_features}
        wrap_linears(model, found, lambda name, linear: TTLoRALinear(
            linear, config["r"], config["lora_alpha"], config["lora_dropout"], rank, shapes))
    else:
        found = find_linears(model, config["adapter_modules"], flag="adapter_modules")
        for _, linear in found:
            used |= {config["bottleneck"], linear.out_features}
        wrap_linears(model, found, lambda name, linear: TTAdapterLinear(
            linear, config["bottleneck"], config["non_linearity"], config["adapter_scaling"], rank, shapes))
    config["tt_shapes"] = [f"{dim}:{'x'.join(map(str, factors_for(dim, shapes)))}" for dim in sorted(used)]
    train_only(model, adapter_names(model, config))
    model.adaptlab_adapter = {"kind": KIND, "config": config}
    return model


def adapter_names(model: nn.Module, config: dict | None = None) -> set[str]:
    """The tensors an exported LoRETTA adapter holds (loretta_adp: the norms' too)."""
    config = config or model.adaptlab_adapter["config"]
    names = wrapper_parameter_names(model, (TTLoRALinear, TTAdapterLinear))
    if config["tuning_type"] == "loretta_adp":
        names |= norm_parameter_names(model)
    return names


def merge(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that lm-eval can score, ``model`` itself untouched: loretta_rep folded
    into plain nn.Linear weights (a plain transformers model); loretta_adp with its adapters kept
    (non-linear: no weights compute it)."""
    clone = plain_copy(model)
    if foldable(clone.adaptlab_adapter["config"]):
        return fold_wrappers(clone, (TTLoRALinear,))
    return clone
