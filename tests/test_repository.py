"""The repository's generated files agree with what generates them: plan.yaml with params.yaml's
tables (dvc.yaml loops over it) and docs/methods.md with the method docstrings."""

from __future__ import annotations

from conftest import PYTHON, ROOT, check, run_cmd, run_script


def test_plan_and_methods_doc_are_current(script_env):
    check(run_script("stages/plan.py", "--check", cwd=ROOT, env=script_env))
    check(run_script("stages/methods_doc.py", "--check", cwd=ROOT, env=script_env))


def test_every_table_row_and_sequence_is_in_the_plan():
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    plan = yaml.safe_load((ROOT / "plan.yaml").read_text())
    for name, table in params["tables"].items():
        for row in table["rows"]:
            for sequence in table["sequences"]:
                for seed in table["seeds"]:
                    run = f"{row}-{sequence}-s{seed}"
                    assert run in plan["runs"] and f"{name}.{run}" in plan["collected"], (name, run)


SCRIPTS = sorted([*ROOT.glob("methods/*.py"), *ROOT.glob("stages/*.py")])


def first_outside_import(path) -> str | None:
    """The module of a file's first top-level import that is neither the standard library nor
    ``__future__``: the one whose loading comes first after Python's own."""
    import ast
    import sys

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.names[0].name if isinstance(node, ast.Import) else node.module or ""
            if module.split(".")[0] not in sys.stdlib_module_names | {"__future__"}:
                return module
    return None


def test_every_script_imports_the_core_before_any_third_party_package():
    # torch reads OMP_WAIT_POLICY once, when it loads; the core sets it (passive waiting is what
    # keeps a step from running 20-30x slower on a busy machine), so it must load first.
    late = {}
    for path in SCRIPTS:
        module = first_outside_import(path)
        if module and not (module.startswith("stages.core") or module.split(".")[0] == "methods"):
            late[path.relative_to(ROOT).as_posix()] = module
    assert not late, f"scripts importing a package before stages.core: {late}"


def test_a_method_run_by_hand_loads_torch_with_passive_waiting(script_env):
    # What the static check stands for: run as `python methods/lora4sft.py`, with no thread
    # settings in the environment, torch finds OpenMP's passive wait already set when it loads.
    probe = (
        "import os, runpy, sys\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and 'seen' not in globals():\n"
        "            globals()['seen'] = os.environ.get('OMP_WAIT_POLICY')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch())\n"
        "sys.path.insert(0, 'methods')\n"
        "runpy.run_path('methods/lora4sft.py', run_name='probe')\n"
        "print('policy when torch loaded:', seen)\n")
    env = {k: v for k, v in script_env.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    result = check(run_cmd([PYTHON, "-c", probe], ROOT, env))
    assert "policy when torch loaded: PASSIVE" in result.stdout, result.stdout
