"""The repository's generated files agree with what generates them: plan.yaml with params.yaml's
tables (dvc.yaml loops over it) and docs/methods.md with the method docstrings."""

from __future__ import annotations

from conftest import ROOT, check, run_script


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
