"""Adapters that no library carries (LoRETTA, LoRAN), saved and merged as cleanly as peft's.

A method whose layers peft does not know saves, after every task, a folder holding
  adaptlab_adapter.json       {"kind": "<kind>", "config": {...}}; kind names a module methods/<kind>.py
  adapter_model.safetensors   the adapter's tensors, by parameter name in the plain transformers model
and that module implements
  attach(model, config) -> model       add the (untrained) adapter layers to a plain transformers model
  merge(model) -> PreTrainedModel      a plain transformers model that computes the same function
                                       (the adapters folded into the weights), for lm-eval and merging
and may implement
  foldable(config) -> bool             False when merge cannot fold the adapter into the weights (a
                                       non-linear adapter such as LoRETTA's bottleneck adapters): merge
                                       then returns the model with its adapter layers kept
``stages/merge.py`` merges such a folder onto its base model with ``save_merged``: the folded model,
or, for an adapter that does not fold, the base weights with the adapter files beside them, a
folder that ``models.load_model`` loads as base + attached adapter.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file, save_file

from .errors import fail
from .io import atomic_write_json, read_json

ADAPTER_CONFIG = "adaptlab_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def kind_module(kind: str) -> ModuleType:
    """methods/<kind>.py, checked to define attach and merge."""
    try:
        module = importlib.import_module(f"methods.{kind}")
    except ModuleNotFoundError:
        fail(f"adapter kind '{kind}' has no module methods/{kind}.py")
    missing = [name for name in ("attach", "merge") if not callable(getattr(module, name, None))]
    if missing:
        fail(f"methods/{kind}.py lacks {', '.join(missing)}: an adapter kind needs attach(model, config) and merge(model)")
    return module


def is_saved_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def save_adapter(model: torch.nn.Module, path: str | Path, kind: str, config: dict, names: set[str]) -> None:
    """Write the tensors ``names`` of ``model`` and the kind + config that rebuild its layers."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n in names}
    if set(state) != set(names):
        fail(f"adapter '{kind}': {len(set(names) - set(state))} of its tensors are not in the model")
    save_file(state, path / ADAPTER_WEIGHTS)
    atomic_write_json(path / ADAPTER_CONFIG, {"kind": kind, "config": config})


def load_adapter(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``model`` (plain transformers) with the saved adapter attached and its tensors loaded."""
    path = Path(path)
    if not is_saved_adapter(path):
        fail(f"'{path}' has no {ADAPTER_CONFIG}: expected an adapter saved by a method script")
    saved = read_json(path / ADAPTER_CONFIG)
    model = kind_module(saved["kind"]).attach(model, saved["config"])
    state = load_file(path / ADAPTER_WEIGHTS)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        fail(f"adapter '{path}' holds {len(unknown)} tensors the model does not have (first: {unknown[0]}): another base model?")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                fail(f"adapter '{path}': {name} has shape {tuple(value.shape)}, the model's is {tuple(params[name].shape)}")
            params[name].copy_(value)
    return model


def merge_saved(base_model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """The plain transformers model = base + the saved adapter, folded."""
    saved = read_json(Path(adapter_dir) / ADAPTER_CONFIG)
    return kind_module(saved["kind"]).merge(load_adapter(base_model, adapter_dir))


def foldable(adapter_dir: str | Path) -> bool:
    """Whether the saved adapter folds into its base model's weights (its kind's ``foldable``)."""
    saved = read_json(Path(adapter_dir) / ADAPTER_CONFIG)
    module = kind_module(saved["kind"])
    return bool(getattr(module, "foldable", lambda config: True)(saved["config"]))


def save_merged(base_model: torch.nn.Module, adapter_dir: str | Path, out: str | Path) -> None:
    """Write base + the saved adapter as a folder that ``models.load_model`` (and so the evaluate
    stage) loads: folded weights when the adapter folds, else the base weights plus the adapter's
    two files, which load_model attaches again."""
    if foldable(adapter_dir):
        merge_saved(base_model, adapter_dir).save_pretrained(out, safe_serialization=True)
        return
    base_model.save_pretrained(out, safe_serialization=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(Path(adapter_dir) / name, Path(out) / name)
    load_adapter(base_model, adapter_dir)  # an adapter that does not fit the base fails now, not when scored
