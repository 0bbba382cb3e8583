"""Typed settings (stages/core/settings.py): --help gives every flag its type, allowed values and
meaning; params.yaml reads back what `dvc exp run -S` wrote, with the declared types; a value of
the wrong type or an unknown key is one error naming the key, before any work; every section of
the repository's params.yaml builds. The sweeps themselves run last, in a temporary git + DVC
repository. (The same errors through the scripts, exit code and no output left: test_errors.py;
fuzzed values: test_robustness.py.)"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess

from stages.core import settings
from stages.core.config import load_params
from stages.core.errors import AdaptlabError
from stages.core.sft import build_config, script_of

import pytest
from conftest import LORA, ROOT, VENV_BIN, check, read_json, run_cmd, tiny_params, write_params

PARAMS = load_params(ROOT / "params.yaml")
SCRIPTS = {row: script_of(row, spec) for row, spec in PARAMS["methods"].items()}
MEZO = dict(LORA, tuning="full", zo_eps=1e-3, lr=1e-4, lora_dropout=0.0, mixed_precision="no")


def method_of(row: str):
    return importlib.import_module(f"methods.{SCRIPTS[row].removesuffix('.py')}").METHOD


def settings_classes(row: str) -> list[type]:
    return [settings.RunSettings, settings.TrainSettings] + [c for c in [method_of(row).settings] if c]


# ----------------------------------------------------------------------------- the repository's params.yaml


@pytest.mark.parametrize("row", list(PARAMS["methods"]))
def test_every_section_of_the_repository_params_builds_on_its_sequences(row, monkeypatch):
    monkeypatch.chdir(ROOT)
    sequences = {s for table in PARAMS["tables"].values() if row in table["rows"] for s in table["sequences"]}
    for sequence in sorted(sequences) or ["default"]:
        cfg = build_config(method_of(row), ["--method", row, "--sequence", sequence])
        assert (cfg.method, cfg.sequence) == (row, sequence)
        for key, value in PARAMS["methods"][row].items():
            assert key in settings.names(method_of(row).settings) + settings.names(settings.TrainSettings) or \
                key in ("script", "decompose", "base")
            assert getattr(cfg, key, value) == value or key == "mixed_precision", key


# "  --r INT   rank of A ... (default: 8)": the flag, its type (INT, FLOAT, STR, the choices, or
# --x/--no-x for a boolean), its meaning and its default; argparse wraps the text over lines.
ENTRY = re.compile(r"^  --(\w+)(.*?)(?=^  --|^\S|\Z)", re.M | re.S)
TYPED = re.compile(r"^(?:(?P<kind>INT|FLOAT|STR|\{(?P<choices>[\w,]+)\})(?: \[(?P=kind) \.\.\.\])?|, --no-\w+) "
                   r"(?P<meaning>.+) \(default: (?P<default>.*)\)$")


@pytest.mark.parametrize("script", sorted(set(SCRIPTS.values())))
def test_help_gives_every_flag_its_type_allowed_values_and_meaning(script, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    row = next(r for r, s in SCRIPTS.items() if s == script)
    with pytest.raises(SystemExit) as exit_info:
        build_config(method_of(row), ["--method", row, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    out = out[out.index("\nrun:"):]  # the flags, after the method's docstring
    entries = {m.group(1): " ".join(m.group(2).split()) for m in ENTRY.finditer(out)}
    specs = {spec.name: spec for cls in settings_classes(row) for spec in settings.specs(cls)}
    assert sorted(entries) == sorted(specs)
    for name, text in entries.items():
        parsed = TYPED.match(text)
        assert parsed, f"--{name}: {text}"
        assert len(parsed["meaning"].split()) >= 3, f"--{name} has no meaning: {text}"
        assert (parsed["choices"] or "").split(",") == list(specs[name].choices or [""]), f"--{name}: {text}"


def test_every_setting_has_a_one_line_meaning():
    classes = {cls for row in PARAMS["methods"] for cls in settings_classes(row)}
    for cls in classes:
        for spec in settings.specs(cls):
            assert spec.help and "\n" not in spec.help, f"{cls.__name__}.{spec.name}"


# ----------------------------------------------------------------------------- values and their types


def test_params_as_dvc_rewrites_them_read_back_with_their_declared_types(tmp_path, monkeypatch):
    """`dvc exp run -S` rewrites params.yaml with ruamel (YAML 1.2): "no" loses its quotes, 1e-5 is
    written 1e-05. Read as YAML 1.1 (PyYAML) those are False and a string; here, "no" and a number."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` runs on params.yaml

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_params(methods={"lora": dict(LORA), "mezo": MEZO}))
    apply_overrides("params.yaml", ["methods.mezo.lr=1e-5", "methods.lora.r=4", "train.chat_template=true"])
    text = (tmp_path / "params.yaml").read_text()
    assert "mixed_precision: no\n" in text and "lr: 1e-05\n" in text
    mezo = build_config(importlib.import_module("methods.mezo4sft").METHOD, [])
    assert (mezo.mixed_precision, mezo.lr, mezo.chat_template) == ("no", 1e-05, True) and isinstance(mezo.lr, float)
    assert build_config(importlib.import_module("methods.lora4sft").METHOD, []).r == 4


@pytest.mark.parametrize("where, value, message", [
    ("methods.lora.r", "abc", "methods.lora.r must be an integer, got 'abc'"),
    ("methods.lora.r", 8.5, "methods.lora.r must be an integer, got 8.5"),
    ("methods.lora.r", True, "methods.lora.r must be an integer, got True"),
    ("methods.lora.lora_dropout", "nan", "methods.lora.lora_dropout must be a finite number, got 'nan'"),
    ("methods.lora.target_modules", "q_proj", "methods.lora.target_modules must be a list of strings, got 'q_proj'"),
    ("train.lr", "fast", "train.lr must be a number, got 'fast'"),
    ("train.mixed_precision", False, "train.mixed_precision must be one of auto, bf16, fp16, no, got False"),
    ("train.scheduler", "cosin", "train.scheduler must be one of cosine, linear, constant, constant_with_warmup, got 'cosin'"),
    ("sequences.s.chat_template", "yes", "sequences.s.chat_template must be true or false, got 'yes'"),
])
def test_a_value_of_the_wrong_type_is_one_error_naming_its_key(where, value, message, tmp_path, monkeypatch):
    params = tiny_params(sequences={"default": ["mc", "gen"], "s": {"tasks": ["mc"]}})
    *path, key = where.split(".")
    node = params
    for part in path:
        node = node[part]
    node[key] = value
    write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdaptlabError) as err:
        build_config(importlib.import_module("methods.lora4sft").METHOD, ["--sequence", "s"])
    assert str(err.value) == message


def test_quoted_numbers_are_read_as_the_command_line_reads_them(tmp_path, monkeypatch):
    """A value is converted by its declared type, the same from params.yaml as from the command
    line: a quoted "8" or "1e-3" is a number where a number is declared, "8" a string where a string is."""
    write_params(tmp_path / "params.yaml", tiny_params(methods={"lora": dict(LORA, r="8", lora_dropout="1e-3",
                                                                             target_modules=["8"])}))
    monkeypatch.chdir(tmp_path)
    cfg = build_config(importlib.import_module("methods.lora4sft").METHOD, [])
    assert (cfg.r, cfg.lora_dropout, cfg.target_modules) == (8, 1e-3, ["8"])


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("section, edit, message", [
    ("methods.lora", {"rank": 4, "lora_alpah": 64},
     "methods.lora.rank is not a known key; methods.lora.lora_alpah is not a known key: did you mean 'lora_alpha'?"),
    ("train", {"warmup": 0.1}, "train.warmup is not a known key: did you mean 'warmup_ratio'?"),
    ("sequences.s", {"max_len": 64}, "sequences.s.max_len is not a known key: did you mean 'max_length'?"),
])
def test_an_unknown_key_is_one_error_naming_the_closest_known_one(section, edit, message, tmp_path, monkeypatch):
    params = tiny_params(sequences={"default": ["mc", "gen"], "s": {"tasks": ["mc"]}})
    node = params
    for part in section.split("."):
        node = node[part]
    node.update(edit)
    write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdaptlabError) as err:
        build_config(importlib.import_module("methods.lora4sft").METHOD, ["--sequence", "s"])
    assert str(err.value).startswith(message + f" ({section} takes ")


def test_a_table_or_decompose_section_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    from stages import decompose
    from stages.plan import build_plan

    tables = {"default": {"sequences": ["default"], "row": ["lora"], "reference": "lora", "seeds": [0]}}
    with pytest.raises(AdaptlabError, match=re.escape("tables.default.row is not a known key: did you mean 'rows'?")):
        build_plan(tiny_params(tables=tables))
    corda = {"r": 8, "decompose": {"script": "build_corda.py", "arg": {"r": 8}}}
    write_params(tmp_path / "params.yaml", tiny_params(methods={"lora": LORA, "corda_kpa": corda}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        decompose.main(["--method", "corda_kpa", "--out", "init/corda_kpa"])
    assert exit_info.value.code == 2
    assert "methods.corda_kpa.decompose.arg is not a known key: did you mean 'args'?" in capsys.readouterr().err
    # The row's own settings are checked before the decomposition starts.
    corda = {"script": "corda4sft.py", "r": "abc", "decompose": {"script": "build_corda.py", "args": {"r": 8}}}
    write_params(tmp_path / "params.yaml", tiny_params(methods={"lora": LORA, "corda_kpa": corda}))
    with pytest.raises(SystemExit) as exit_info:
        decompose.main(["--method", "corda_kpa", "--out", "init/corda_kpa"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: methods.corda_kpa.r must be an integer, got 'abc'\n"
    assert not (tmp_path / "init").exists()


# ----------------------------------------------------------------------------- dvc exp run -S

DVC_YAML = """\
stages:
  settings:   # every methods section's config, as its script builds it
    cmd: python settings_of.py settings.json
    deps: [settings_of.py, stages, methods]
    params:
      - params.yaml:
    outs:
      - settings.json:
          cache: false
"""


def swept(params: dict, rows: tuple[str, ...]) -> tuple[list[str], dict[str, dict]]:
    """-S overrides that set every int, float, bool and choice setting of ``train`` and of the
    rows' sections to a new valid value, and the value each row must then read."""
    def new(spec, value):
        if spec.scalar is bool:
            return not value
        if spec.scalar is int:
            return value + 1
        if spec.scalar is float:
            return value / 2 if value else 0.25
        return spec.choices[spec.choices.index(value) - 1]  # auto -> no: the value YAML 1.1 reads as false

    def shown(value):
        return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)

    def sweepable(spec):
        return not spec.many and (spec.scalar is not str or spec.choices)

    train_specs = {spec.name: spec for spec in settings.specs(settings.TrainSettings)}
    train = {key: new(train_specs[key], value) for key, value in params["train"].items() if sweepable(train_specs[key])}
    overrides = [f"train.{key}={shown(value)}" for key, value in train.items()]
    expected = {}
    for row in rows:
        specs = {**train_specs, **{spec.name: spec for spec in settings.specs(method_of(row).settings)}}
        own = {key: new(specs[key], value) for key, value in params["methods"][row].items() if key in specs and sweepable(specs[key])}
        overrides += [f"methods.{row}.{key}={shown(value)}" for key, value in own.items()]
        expected[row] = {**train, **own}
    return overrides, expected


def test_dvc_exp_run_sweeps_read_back_and_a_rejected_temp_run_changes_nothing(tmp_path, script_env):
    """In a git + DVC repository with the project's code and params.yaml, whose one stage builds the
    config of every methods section (tests/settings_of.py): the issue's sweep, then every numeric,
    boolean and choice setting of two methods at once; each reads back with its value and type,
    and every method script still reads the rewritten file. `dvc exp apply` restores what the
    sweep wrote. A rejected value: one error line naming the key; `dvc exp run --temp` leaves the
    workspace as it was, while a plain `dvc exp run` has written the value into params.yaml before
    any stage ran and DVC keeps it there."""
    repo, env = tmp_path / "repo", dict(script_env)
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=ignore)
    shutil.copytree(ROOT / "methods", repo / "methods", ignore=ignore)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    shutil.copy(ROOT / "tests" / "settings_of.py", repo / "settings_of.py")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "tests@adaptlab"], ["git", "config", "user.name", "tests"],
                ["git", "config", "commit.gpgsign", "false"], [VENV_BIN / "dvc", "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "project"]):
        check(run_cmd(cmd, repo, env))

    def exp_run(*overrides: str, temp: bool = False) -> subprocess.CompletedProcess:
        sets = [arg for override in overrides for arg in ("-S", override)]
        return run_cmd([VENV_BIN / "dvc", "exp", "run", *(["--temp"] if temp else []), *sets], repo, env, timeout=600)

    # The sweep: DVC rewrites the whole file (mezo's "no" unquoted, 1e-5 as 1e-05) and every
    # section still builds, with the swept values.
    first = check(exp_run("methods.mezo.lr=1e-5", "methods.lora.r=4"))
    written = (repo / "params.yaml").read_text()
    assert re.search(r"^ +mixed_precision: no +#", written, re.M) and re.search(r"^ +lr: 1e-05 +#", written, re.M)
    configs = read_json(repo / "settings.json")
    assert set(configs) == set(PARAMS["methods"])
    assert (configs["mezo"]["lr"], configs["mezo"]["mixed_precision"], configs["lora"]["r"]) == (1e-05, "no", 4)

    # Every numeric, boolean and choice setting of two methods (and of train:) at once.
    overrides, expected = swept(load_params(repo / "params.yaml"), ("mezo", "lora"))
    check(exp_run(*overrides))
    configs = read_json(repo / "settings.json")
    for row, values in expected.items():
        for key, value in values.items():
            assert (configs[row][key], type(configs[row][key])) == (value, type(value)), f"{row}.{key}"

    experiment = re.search(r"Reproducing experiment '([^']+)'", first.stdout + first.stderr).group(1)
    check(run_cmd([VENV_BIN / "dvc", "exp", "apply", experiment], repo, env))
    assert (repo / "params.yaml").read_text() == written

    # A rejected value. --temp: the workspace is as it was; in the workspace: DVC's edit stays.
    before = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock", "settings.json")}
    status = check(run_cmd(["git", "status", "--porcelain"], repo, env)).stdout
    for temp in (True, False):
        rejected = exp_run("methods.lora.r=abc", temp=temp)
        assert rejected.returncode != 0
        assert "error: methods.lora.r must be an integer, got 'abc'" in rejected.stdout + rejected.stderr
        assert "Traceback" not in rejected.stdout + rejected.stderr
        after = {name: (repo / name).read_bytes() if (repo / name).exists() else None for name in before}
        if temp:
            assert after == before and check(run_cmd(["git", "status", "--porcelain"], repo, env)).stdout == status
        else:
            assert re.search(rb"^    r: abc$", after["params.yaml"], re.M) and after["dvc.lock"] == before["dvc.lock"]
