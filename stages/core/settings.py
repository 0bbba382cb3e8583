"""Typed settings: each setting's type, allowed values and meaning, written once.

params.yaml holds the values (what DVC tracks); a settings class, a dataclass as peft's configs
are, says what they are. A field is ``setting(help=...)``: required (params.yaml or the command
line must give it) unless it has a ``default``; ``choices`` lists the strings it allows; the
class's ``__post_init__`` checks ranges. A value is converted by its field's declared type, the
same way whether it comes from params.yaml or from the command line, never by what its YAML scalar
looks like: ``mixed_precision: no`` is the string "no", ``r: abc`` is an error naming the key.

A method script's settings are three classes: ``RunSettings`` (the command line only),
``TrainSettings`` (params ``train:``, overridden by ``sequences.<s>`` and ``methods.<m>``) and the
method's own (``Method(settings=...)``: the fields of ``methods.<m>``). ``LoraSettings`` and
``TunedSettings`` are the LoRA fields every LoRA-based method shares.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import fail
from .evaluation import SCORERS

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, *, help: str, choices: Sequence[str] | None = None) -> Any:
    """A settings field: its one-line meaning, its allowed strings, and a default if it may be left out."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def like(cls: type, name: str, default: Any = MISSING) -> Any:
    """The field ``name`` of ``cls``, its meaning and choices written once there, for another
    class: required, or with ``default`` (the encoder takes LoRA's fields, needed by one kind only)."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    return setting(default, help=meta["help"], choices=meta["choices"])


class Spec(NamedTuple):
    """What a field's declared type allows: ``scalar`` (int, float, bool or str), a list of them
    (``many``), or also None (``optional``)."""

    name: str
    scalar: type
    many: bool
    optional: bool
    choices: tuple[str, ...] | None
    help: str
    default: Any


def specs(cls: type) -> list[Spec]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint, optional, many = hints[f.name], False, False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint, optional = args[0], True
        if typing.get_origin(hint) is list:
            hint, many = typing.get_args(hint)[0], True
        if hint not in (int, float, bool, str):
            raise TypeError(f"{cls.__name__}.{f.name}: settings are int, float, bool, str or lists of them, not {hint}")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        out.append(Spec(f.name, hint, many, optional, f.metadata.get("choices"), f.metadata.get("help", ""), default))
    return out


def names(cls: type | None) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if cls else []


# ----------------------------------------------------------------------------- conversion

KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
LIST_NAMES = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def convert_one(value: Any, spec: Spec) -> Any:
    """One value as ``spec.scalar``: the value itself if it has that type, or parsed from a string
    (a command-line word, or a quoted YAML scalar); ValueError says what was expected."""
    kind, expected = spec.scalar, KIND_NAMES[spec.scalar]
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, bool):
            return value
    elif kind is str:
        if isinstance(value, str):
            if spec.choices and value not in spec.choices:
                raise ValueError(f"must be one of {', '.join(spec.choices)}, got {value!r}")
            return value
    elif not isinstance(value, bool):  # True is an int to Python, not a number to a reader
        try:
            number = kind(value.strip()) if isinstance(value, str) else value
        except ValueError:
            number = None
        if kind is int and isinstance(number, int):
            return number
        if kind is float and isinstance(number, (int, float)):
            if not math.isfinite(number):
                raise ValueError(f"must be a finite number, got {value!r}")
            return float(number)
    if spec.choices:
        expected = f"one of {', '.join(spec.choices)}"
    raise ValueError(f"must be {expected}, got {value!r}")


def convert(value: Any, spec: Spec) -> Any:
    """A params.yaml value as its field's declared type (ValueError says what was expected)."""
    if value is None and spec.optional:
        return None
    if not spec.many:
        return convert_one(value, spec)
    if not isinstance(value, list):
        raise ValueError(f"must be a list of {LIST_NAMES[spec.scalar]}, got {value!r}")
    return [convert_one(v, spec) for v in value]


def values_of(cls: type | None, section: dict, where: str) -> dict:
    """The values ``section`` (params.yaml ``where``) gives ``cls``'s fields, converted; a value
    of the wrong type is an error naming its key."""
    out = {}
    for spec in specs(cls) if cls else []:
        if spec.name in section:
            try:
                out[spec.name] = convert(section[spec.name], spec)
            except ValueError as err:
                fail(f"{where}.{spec.name} {err}")
    return out


# ----------------------------------------------------------------------------- command line

METAVARS = {int: "INT", float: "FLOAT", str: "STR"}


def shown(value: Any) -> str:
    if value is MISSING:
        return "required"
    if value is None:
        return "none"
    if value == "":
        return '""'
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def add_flags(parser: argparse.ArgumentParser, cls: type | None, values: dict, title: str) -> None:
    """One flag per field of ``cls``, its default from ``values`` (else the field's), its value
    converted as params.yaml values are; --help shows the type (INT, FLOAT, STR or the choices),
    the meaning and the default. Booleans are --flag / --no-flag."""
    group = parser.add_argument_group(title, " ".join((cls.__doc__ or "").split()) if cls else None)
    for spec in specs(cls) if cls else []:
        default = values.get(spec.name, spec.default)
        meaning = f"{spec.help} (default: {shown(default)})".replace("%", "%%")
        if spec.scalar is bool and not spec.many:
            action = group.add_argument(f"--{spec.name}", action=argparse.BooleanOptionalAction, default=default)
        else:
            def parse(text: str, spec: Spec = spec) -> Any:
                try:
                    return convert_one(text, spec)
                except ValueError as err:
                    raise argparse.ArgumentTypeError(str(err)) from None

            metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else METAVARS[spec.scalar]
            action = group.add_argument(f"--{spec.name}", type=parse, default=default, metavar=metavar,
                                        nargs="+" if spec.many else None)
        action.help = meaning


def instance(cls: type, values: dict, origin: str) -> Any:
    """``cls`` from the parsed values: a required field nobody gave is an error naming where it
    belongs (``origin``: its params section); ``__post_init__`` checks the rest."""
    for spec in specs(cls):
        if values[spec.name] is MISSING:
            fail(f"{origin}.{spec.name} is not set: {spec.help} (give it in params.yaml or as --{spec.name})")
    return cls(**{name: values[name] for name in names(cls)})


# ----------------------------------------------------------------------------- checks

def check_positive(settings: Any, *fields: str) -> None:
    for name in fields:
        value = getattr(settings, name)
        if value is not None and value <= 0:
            fail(f"--{name} must be a positive {'integer' if isinstance(value, int) else 'number'}, got {value!r}")


def check_non_negative(settings: Any, *fields: str) -> None:
    for name in fields:
        value = getattr(settings, name)
        if value is not None and value < 0:
            fail(f"--{name} must be a number >= 0, got {value!r}")


def check_not_empty(settings: Any, *fields: str) -> None:
    for name in fields:
        if getattr(settings, name) == []:
            fail(f"--{name} must name at least one, got none")


def check_fraction(settings: Any, *fields: str) -> None:
    """Each of ``fields`` in [0, 1) (a dropout, a warm-up fraction)."""
    for name in fields:
        value = getattr(settings, name)
        if value is not None and not 0 <= value < 1:
            fail(f"--{name} must be in [0, 1), got {value!r}")


def library_check(check: Callable[..., object], what: str = "", **kwargs: Any) -> None:
    """Run a library's own checks of the settings now, before any work, as one error line
    (``what``: prefix): ``check`` is its config class (peft's) or checking function."""
    try:
        check(**kwargs)
    except (ValueError, TypeError) as err:
        fail(f"{what}{' '.join(str(err).split())}")


# ----------------------------------------------------------------------------- the core's settings

@dataclass(kw_only=True)
class RunSettings:
    """What the run reads and where it writes (command line only)."""

    params: str = setting(help="the params file")
    method: str = setting(help="the params section methods.METHOD this run reads (a row of the tables)")
    sequence: str = setting("default", help="the task sequence, a key of params.yaml sequences")
    seed: int = setting(0, help="seed of initialisation, batch order and dropout")
    base_model: str = setting(help="the model folder to start from, or a decompose stage's models/init/<row> folder")
    tasks_dir: str = setting("data/tasks", help="the task files fetch_data wrote")
    eval_limit: int = setting(0, help="score only the first N test rows of each task; 0: all of them")
    output_dir: str = setting("", help="where the adapters go; empty: runs/<method>-<sequence>-s<seed>")
    results_dir: str = setting("", help="where metrics and the loss curve go; empty: results/train/<method>-<sequence>-s<seed>")
    work_dir: str = setting("", help="checkpoints while training; empty: checkpoints/<method>-<sequence>-s<seed>")

    def __post_init__(self):
        check_non_negative(self, "seed", "eval_limit")


SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("auto", "bf16", "fp16", "no")


@dataclass(kw_only=True)
class TrainSettings:
    """The training loop's settings, shared by every method."""

    batch_size: int = setting(help="training rows per micro-batch and process")
    grad_accum: int = setting(help="micro-batches per optimizer step (gradient accumulation)")
    steps_per_task: int = setting(help="optimizer steps on each task of the sequence")
    max_length: int = setting(help="tokens per row at most: a longer prompt loses its start")
    lr: float = setting(help="peak learning rate")
    weight_decay: float = setting(help="decoupled weight decay (never on biases and norms)")
    warmup_ratio: float = setting(help="fraction of each task's steps spent warming the learning rate up, in [0, 1)")
    scheduler: str = setting(help="learning-rate schedule over each task (transformers' get_scheduler)", choices=SCHEDULERS)
    max_grad_norm: float = setting(help="clip the gradient's norm to this; 0: no clipping")
    checkpoint_every: int = setting(help="steps between checkpoints (a killed run resumes from the last one)")
    log_every: int = setting(help="steps between logged losses (the mean since the last log)")
    eval_batch_size: int = setting(help="rows per batch when lm-eval scores the tasks")
    mixed_precision: str = setting("no", choices=PRECISIONS,
                                   help="autocast for training; auto: bf16 where the hardware computes it natively "
                                        "(GPU, CPU with AMX or AVX512-BF16), else no (fp32); weights and scoring stay fp32")
    save_every_task: bool = setting(help="keep the model after every task in the run folder, not only the final one")
    chat_template: bool = setting(False, help="train and score through the tokenizer's chat template "
                                              "(user turn = prompt, assistant turn = answer)")
    scorer: str = setting("fast", choices=SCORERS,
                          help="what scores the accuracy matrix: fast (lm-eval's requests and metrics, each context run "
                               "once, KV-cached generation: stages/core/scoring.py) or lm_eval; the evaluate stage is lm-eval")
    full_matrix: bool = setting(False, help="score every cell of the accuracy matrix; false: on sequences of 4+ tasks "
                                            "only the 3T-2 cells AP, BWT and FWT read (the others are null)")

    def __post_init__(self):
        check_positive(self, "lr", "batch_size", "grad_accum", "steps_per_task", "max_length", "checkpoint_every",
                       "log_every", "eval_batch_size")
        check_non_negative(self, "weight_decay", "max_grad_norm")
        check_fraction(self, "warmup_ratio")


@dataclass(kw_only=True)
class LoraSettings:
    """LoRA: h = W0·x + (lora_alpha / r)·B·A·dropout(x) on the target layers."""

    r: int = setting(help="rank of A (r x in) and B (out x r)")
    lora_alpha: int = setting(help="scale numerator: the update is (lora_alpha / r)·B·A")
    lora_dropout: float = setting(help="dropout on the adapter's input, in [0, 1)")
    target_modules: list[str] = setting(help="names of the linear layers the method adapts (q_proj v_proj ...)")

    def __post_init__(self):
        check_positive(self, "r", "lora_alpha")
        check_fraction(self, "lora_dropout")
        check_not_empty(self, "target_modules")


@dataclass(kw_only=True)
class TunedSettings(LoraSettings):
    """What trains: every weight (full) or a LoRA (its settings apply with --tuning lora only)."""

    tuning: str = setting(help="full: every weight of the base model trains; lora: only a LoRA's A and B",
                          choices=("full", "lora"))
