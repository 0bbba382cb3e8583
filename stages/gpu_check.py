"""The GPU check: every method for a few steps on one device, then merge, evaluate and the bench.

    make gpu-check                                   # on a machine with a CUDA GPU (bf16)
    python stages/gpu_check.py --rows lora galore    # some rows only
    python stages/gpu_check.py --device cpu --rows lora --steps 1 --eval_limit 2   # the same path on the CPU

Every row of params.yaml ``methods`` that trains a causal LM (a ``*4sft.py`` script) runs on the
default sequence for ``--steps`` optimizer steps per task, scored on ``--eval_limit`` test rows per
task, in bf16 on the GPU; a row with a decompose step (CorDA, CIMEO) builds it first. Then one
adapter row and one full-weight row are merged and scored by lm-eval (``stages/evaluate.py``), and
``stages/bench.py`` times one step of the default table's rows. What each ran, its one-line error
if it failed, its step time and peak memory (``torch.cuda.max_memory_allocated``) go to
``<out>/gpu.md`` and ``<out>/gpu.json`` with the device's name; the bench's table to
``<out>/bench.md``. Runs are throw-away: they live in a temporary folder under ``--scratch``.

A row that fails does not stop the check: the table says which failed and how, and the exit code
is 1 when any did. ``--device cpu`` hides the GPU from every child process (the CPU path of the
same script, which the tests run on the tiny model).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stages.core.config import OneLineParser, load_params, params_path, section
from stages.core.errors import cli_entry, fail
from stages.core.io import atomic_dir, atomic_write_json, atomic_write_text, read_json
from stages.core.markdown import markdown_table
from stages.core.sft import script_of

ROOT = Path(__file__).resolve().parents[1]
# The rows merged and scored by lm-eval after training: an adapter and a full-weight method.
MERGED = ("lora", "galore")


def sft_rows(params: dict) -> list[str]:
    """The rows of params.yaml methods whose script trains a causal LM."""
    return [row for row, spec in section(params, "methods").items() if script_of(row, spec or {}).endswith("4sft.py")]


def one_line(stderr: str) -> str:
    """A failed child's message: its ``error:`` line, else the last line of its traceback."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


class Check:
    def __init__(self, args: argparse.Namespace, params: dict, scratch: Path):
        self.args, self.params, self.scratch = args, params, scratch
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.began = time.monotonic()

    def run(self, what: str, command: list[str]) -> tuple[bool, float, str]:
        """One child process: (succeeded, seconds, its one-line error or '')."""
        began = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:]], env=self.env, capture_output=True, text=True,
                                  timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            return False, time.monotonic() - began, f"{what} did not finish within {self.args.timeout} s"
        seconds = time.monotonic() - began
        return proc.returncode == 0, seconds, "" if proc.returncode == 0 else one_line(proc.stderr)

    def train(self, row: str) -> dict:
        args, spec = self.args, section(self.params, "methods", row) or {}
        start, record = args.base_model, {"row": row}
        if spec.get("decompose"):
            init = self.scratch / "init" / row
            ok, seconds, error = self.run(f"{row}'s decompose", [
                "stages/decompose.py", "--params", str(args.params), "--method", row, "--sequence", args.sequence,
                "--out", str(init)])
            record["decompose_s"] = round(seconds, 1)
            if not ok:
                return {**record, "status": "failed", "error": f"decompose: {error}"}
            start = str(init)
        run = self.scratch / "runs" / row
        ok, seconds, error = self.run(row, [
            f"methods/{script_of(row, spec)}", "--params", str(args.params), "--method", row, "--sequence", args.sequence,
            "--seed", "0", "--base_model", start, "--steps_per_task", str(args.steps), "--eval_limit", str(args.eval_limit),
            "--checkpoint_every", str(args.steps), "--mixed_precision", args.precision,
            "--output_dir", str(run / "out"), "--results_dir", str(run / "results"), "--work_dir", str(run / "work")])
        record.update(seconds=round(seconds, 1), status="ran" if ok else "failed", error=error)
        if ok:
            details, metrics = read_json(run / "results" / "details.json"), read_json(run / "results" / "metrics.json")
            record.update(step_s=details.get("step_time_s"), peak_memory_mb=details.get("peak_memory_mb"), ap=metrics.get("AP"))
        return record

    def merge_and_evaluate(self, row: str) -> dict:
        run = self.scratch / "runs" / row  # where train() put it
        merged = run / "merged"
        ok, seconds, error = self.run(f"{row}'s merge", ["stages/merge.py", "--run", str(run / "out"),
                                                         "--output_path", str(merged)])
        if not ok:
            return {"row": row, "status": "failed", "error": f"merge: {error}"}
        out = run / "eval.json"
        ok, evaluate_s, error = self.run(f"{row}'s evaluate", [
            "stages/evaluate.py", "--params", str(self.args.params), "--model", str(merged), "--sequence", self.args.sequence,
            "--limit", str(self.args.eval_limit), "--out", str(out)])
        if not ok:
            return {"row": row, "status": "failed", "error": f"evaluate: {error}"}
        return {"row": row, "status": "ran", "merge_s": round(seconds, 1), "evaluate_s": round(evaluate_s, 1),
                "scores": read_json(out).get("scores")}

    def bench(self, rows: list[str]) -> tuple[dict, str]:
        out = self.scratch / "bench"
        ok, seconds, error = self.run("the bench", [
            "stages/bench.py", "--params", str(self.args.params), "--methods", *rows, "--precision", self.args.precision,
            "--repeats", "3", "--warmup", "1", "--out", str(out), "--scratch", str(self.scratch / "bench-scratch")])
        if not ok:
            return {"status": "failed", "error": error, "seconds": round(seconds, 1)}, ""
        return {"status": "ran", "seconds": round(seconds, 1)}, (out / "bench.md").read_text()

    def progress(self, done: int, total: int, what: str) -> None:
        spent = time.monotonic() - self.began
        left = spent / done * (total - done)
        print(f"[{done}/{total}] {what} ({spent:.0f} s so far, about {left / 60:.1f} min left)", flush=True)


def device_name(device: str) -> dict:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"device": f"{props.name} ({props.total_memory / 2**30:.0f} GiB)", "torch": torch.__version__,
                "cuda": torch.version.cuda}
    return {"device": f"CPU ({len(os.sched_getaffinity(0))} cores)", "torch": torch.__version__, "cuda": None}


def report(facts: dict, trained: list[dict], merged: list[dict], bench: dict) -> str:
    cell = lambda value, fmt: "" if value is None else format(value, fmt)  # noqa: E731
    rows = [[r["row"], r["status"], cell(r.get("step_s"), ".3f"), cell(r.get("peak_memory_mb"), ".0f"), cell(r.get("ap"), ".3f"),
             cell(r.get("seconds"), ".0f"), r.get("error", "")] for r in trained]
    lines = [f"# GPU check: {facts['device']}", "",
             f"torch {facts['torch']}" + (f", CUDA {facts['cuda']}" if facts["cuda"] else "") +
             f", {'fp32' if facts['precision'] == 'no' else facts['precision']}; every row {facts['steps']} step(s) per task on "
             f"sequence `{facts['sequence']}`, scored on {facts['eval_limit']} test rows per task; {facts['minutes']:.1f} min in all "
             f"({facts['finished']}). `python stages/gpu_check.py` writes this file.", "",
             markdown_table(["row", "status", "step (s)", "peak memory (MiB)", "AP", "wall (s)", "error"], rows), "",
             "## Merged and scored by lm-eval", "",
             markdown_table(["row", "status", "merge (s)", "evaluate (s)", "scores", "error"],
                            [[m["row"], m["status"], cell(m.get("merge_s"), ".0f"), cell(m.get("evaluate_s"), ".0f"),
                              ", ".join(f"{k} {v:.3f}" for k, v in (m.get("scores") or {}).items()), m.get("error", "")]
                             for m in merged]), "",
             f"## Bench: {bench['status']}" + (f" ({bench['error']})" if bench.get("error") else ""), "",
             "[bench.md](bench.md)" if bench["status"] == "ran" else ""]
    return "\n".join(lines).rstrip() + "\n"


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rows", nargs="+", default=None, help="default: every row of params.yaml methods that trains a causal LM")
    parser.add_argument("--sequence", default="default")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per task")
    parser.add_argument("--eval_limit", type=int, default=16, help="test rows scored per task")
    parser.add_argument("--base_model", default=None, help="default: params.yaml base_model.path")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one row may take")
    parser.add_argument("--no_bench", action="store_true", help="skip stages/bench.py")
    parser.add_argument("--out", default="results/gpu")
    parser.add_argument("--scratch", default="checkpoints", help="where the throw-away runs go (a temporary folder inside it)")
    args = parser.parse_args(argv)
    args.params = params_path(args.params)
    params = load_params(args.params)
    rows = args.rows or sft_rows(params)
    for row in rows:  # every bad value before any work
        if row not in section(params, "methods"):
            fail(f"--rows: '{row}' is not a section of params.yaml methods")
        if not script_of(row, section(params, "methods", row) or {}).endswith("4sft.py"):
            fail(f"--rows: '{row}' does not train a causal LM (its script is not a methods/*4sft.py)")
    if args.sequence not in section(params, "sequences"):
        fail(f"--sequence: '{args.sequence}' is not a sequence of params.yaml")
    if min(args.steps, args.eval_limit, args.timeout) < 1:
        fail("--steps, --eval_limit and --timeout must be at least 1")
    args.base_model = args.base_model or section(params, "base_model", "path")
    for needed in (Path(args.base_model) / "config.json", Path("data/tasks")):
        if not needed.exists():
            fail(f"{needed} is missing: run `dvc repro fetch_data build_base` first")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: torch sees no CUDA device (use --device cpu for the CPU path)")
    args.precision = "bf16" if args.device == "cuda" else "no"
    facts = {**device_name(args.device), "precision": args.precision, "steps": args.steps, "sequence": args.sequence,
             "eval_limit": args.eval_limit}

    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.scratch)).resolve()
    try:
        check = Check(args, params, scratch)
        merge_rows = [row for row in MERGED if row in rows]
        total = len(rows) + len(merge_rows) + (0 if args.no_bench else 1)
        trained = []
        for row in rows:
            trained.append(check.train(row))
            r = trained[-1]
            check.progress(len(trained), total, f"{row}: {r['status']}" + (f" ({r['error']})" if r["error"] else
                                                                         f", step {r.get('step_s') or 0:.3f} s"))
        merged = []
        for row in merge_rows:
            record = next(r for r in trained if r["row"] == row)
            merged.append(check.merge_and_evaluate(row) if record["status"] == "ran" else
                          {"row": row, "status": "skipped", "error": "training failed"})
            check.progress(len(trained) + len(merged), total, f"{row} merged and evaluated: {merged[-1]['status']}")
        ran = [r["row"] for r in trained if r["status"] == "ran"]
        table_rows = ((params.get("tables") or {}).get("default") or {}).get("rows") or []
        bench_rows = [row for row in table_rows if row in ran] or ran[:1]  # the default table's rows that trained here
        bench, bench_md = ({"status": "skipped"}, "") if args.no_bench or not bench_rows else check.bench(bench_rows)
        if not args.no_bench:
            check.progress(total, total, f"bench: {bench['status']}" + (f" ({bench['error']})" if bench.get("error") else ""))
        facts.update(minutes=(time.monotonic() - check.began) / 60, finished=time.strftime("%Y-%m-%d %H:%M"))
        with atomic_dir(args.out) as out:
            atomic_write_json(out / "gpu.json", {**facts, "rows": trained, "merged": merged, "bench": bench})
            atomic_write_text(out / "gpu.md", report(facts, trained, merged, bench))
            if bench_md:
                atomic_write_text(out / "bench.md", bench_md)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    failed = [r["row"] for r in trained + merged if r["status"] == "failed"] + (["bench"] if bench["status"] == "failed" else [])
    print(f"wrote {args.out}/gpu.md: {len(trained) - sum(r['status'] == 'failed' for r in trained)}/{len(trained)} rows ran"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
