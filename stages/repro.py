"""`dvc repro` that says first what it will run and how long that should take, and times it.

    python stages/repro.py tables@quick      # what `make repro` runs
    python stages/repro.py                   # every stage (`make repro-all`)
    python stages/repro.py -j 2 tables@gorp  # independent stages two at a time, one thread each
    python stages/repro.py --dry tables@gorp # only the plan and the estimate

Before running it checks that plan.yaml matches params.yaml's tables, lists the stages DVC will
run for the targets (changed ones and everything downstream of them), and prints their number by
kind with an estimate from ``results/timings.json``: the wall time each stage took when this
script last ran it (a stage never run before counts as the median of its kind on its sequence). Then it
runs ``dvc repro`` on the targets, reading DVC's output to time every stage, and merges those
times, with the machine's cores, thread settings and load, into ``results/timings.json``, from
which the README's time figures come.

With ``-j N`` (N > 1) the stages run N at a time, each as soon as the stages it depends on are
done, each with cores/N threads (on 2 cores, two one-thread processes give about 1.5x the
throughput of one two-thread process). DVC runs one stage at a time, so here this script runs each
stage's command itself and then records it exactly as ``dvc repro`` does after running a stage
(DVC's own calls: remove the old outputs, run, save the deps and outs hashes, commit the outputs
to the cache, write the stage's entry of dvc.lock), one stage at a time and under DVC's lock;
a stage whose inputs turn out unchanged once its upstream has run is skipped, as DVC would.
Among the stages ready to start, the one furthest down the pipeline goes first, so a row's merge,
evaluation and collection follow its training instead of waiting for every other row's training.
A failed stage stops the run (running stages finish); with ``--keep-going`` only the stages that
need it are not run.

``--allow-missing`` (DVC's flag of that name) continues the recorded pipeline on a machine that does
not hold its outputs (a fresh clone: this project has no DVC remote, so trained models live only
where they were made): a stage whose dvc.lock entry matches its code, params and inputs is not run
again because its outputs are absent here, and the results it recorded in git stand. A stage that
does run needs its inputs on disk, so a recorded stage whose output such a stage reads and this
machine lacks runs again (training is deterministic: it remakes the recorded output).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from stages.core.config import OneLineParser, load_params
from stages.core.errors import cli_entry, fail
from stages.core.io import atomic_write_json, atomic_write_text, read_json
from stages.core.markdown import markdown_table

from stages.plan import build_plan, check_plan, plan_path

TIMINGS = Path("results/timings.json")
TIMINGS_TABLE = Path("results/timings.md")
RUNNING = re.compile(r"^Running stage '([^']+)':")
# A kind never timed on this machine: a guess in seconds, so a first run still gets an estimate.
FALLBACK = {"fetch_data": 60, "build_base": 40, "build_encoder": 10, "decompose": 150, "evaluate_base": 40, "train": 300,
            "merge": 15, "evaluate": 40, "collect": 2, "tables": 10, "report": 3}


def kind(stage: str) -> str:
    return stage.split("@")[0]


def overlaps(a: str, b: str) -> bool:
    """One path is the other or lies inside it (a dependency on a folder of outputs, or on a file in one)."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class Plan:
    """The stages ``dvc repro [--allow-missing] targets`` has to consider, in DVC's order, with what
    each depends on among them; ``forced``: recorded stages that run again only because a stage that
    runs reads an output of theirs this machine lacks (``allow_missing`` only)."""

    def __init__(self, repo, targets: list[str], allow_missing: bool = False):
        from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

        graph = get_active_graph(repo.index.graph)
        self.allow_missing = allow_missing
        self.steps = plan_repro(graph, collect_stages(repo, targets or ["dvc.yaml"]))
        # DVC's graph points from a stage to the stages it depends on.
        self.upstream = {stage: {up for up in graph.successors(stage) if up in self.steps} for stage in self.steps}
        depth: dict = {}
        for stage in self.steps:  # DVC's order puts a stage after everything it depends on
            depth[stage] = 1 + max((depth[up] for up in self.upstream[stage]), default=0)
        self.depth = depth
        self.will_run: set = set()
        for stage in self.steps:
            if self.upstream[stage] & self.will_run or self.changed(stage):
                self.will_run.add(stage)
        self.forced: set = set()
        pending = list(self.will_run)
        while pending:
            for producer in self.missing_inputs(pending.pop()):
                if producer not in self.will_run and producer not in self.forced:
                    self.forced.add(producer)
                    pending.append(producer)

    def changed(self, stage) -> bool:
        return stage.changed(allow_missing=self.allow_missing, upstream=self.upstream[stage])

    def missing_inputs(self, stage) -> set:
        """The stages whose outputs ``stage`` reads and this machine lacks."""
        return {up for up in self.upstream[stage] for out in up.outs if not out.exists
                and any(overlaps(str(out.fs_path), str(dep.fs_path)) for dep in stage.deps)}

    def to_run(self) -> list:
        return [stage for stage in self.steps if stage in self.will_run or stage in self.forced]


def stages_to_run(targets: list[str], allow_missing: bool = False) -> list[str]:
    """The stages ``dvc repro targets`` will run, in order: changed ones and all downstream of them
    (with ``allow_missing``: and the recorded ones whose missing outputs a running stage reads)."""
    from dvc.repo import Repo

    with Repo(".") as repo, repo.lock:
        return [stage.addressing for stage in Plan(repo, targets, allow_missing).to_run()]


def stage_seconds(timings: dict, sequence=lambda stage: None):
    """Seconds a stage takes: its recorded time, else the median of the recorded stages of its kind
    on the same sequence (where ``sequence`` names one), else of its kind, else a first guess."""
    recorded = timings.get("stages", {})
    like: dict[tuple, list[float]] = {}
    for name, entry in recorded.items():
        for key in {(kind(name), sequence(name)), (kind(name), None)}:
            like.setdefault(key, []).append(entry["seconds"])

    def seconds(stage: str) -> float:
        if stage in recorded:
            return recorded[stage]["seconds"]
        similar = like.get((kind(stage), sequence(stage))) or like.get((kind(stage), None)) or [FALLBACK.get(kind(stage), 60)]
        return statistics.median(similar)

    return seconds


def sequence_of(runs: dict):
    """The sequence a stage works on, for estimates (a cognition run costs more than a default one):
    evaluate_base names it, a run's stages read it from the run plan; None for the rest."""
    def sequence(stage: str) -> str | None:
        item = stage.split("@", 1)[-1]
        return item if kind(stage) == "evaluate_base" else runs["runs"].get(item.split(".", 1)[-1], {}).get("sequence")
    return sequence


def estimate(stages: list[str], timings: dict, runs: dict) -> float:
    seconds = stage_seconds(timings, sequence_of(runs))
    return sum(seconds(stage) for stage in stages)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu(cpuinfo: str | None = None) -> str:
    """The CPU and the unit its bf16 matrix products run on. The unit decides their rounding (AMX,
    AVX512-BF16 and plain AVX512/AVX2 kernels sum in different orders), so a run is bit-identical
    only on the same kind of CPU at the same thread count: on another kind its scores move within
    seed noise. (ONEDNN_MAX_CPU_ISA pins the unit: a machine can reproduce an older one's kernels.)"""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    unit = next((name for name in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if name in flags), "other")
    pinned = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{model.group(1).strip() if model else platform.machine()} ({unit}{', oneDNN ' + pinned if pinned else ''})"


def machine() -> dict:
    return {"cores": cores(), "cpu": cpu(), "load_average_1min": round(os.getloadavg()[0], 2),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def record(timings: dict, stage: str, seconds: float, threads: int | str, runs: dict) -> None:
    """Add a finished stage's time to results/timings.json and regenerate results/timings.md
    (``runs``: params.yaml's run plan, built once per run)."""
    timings.setdefault("stages", {})[stage] = {
        "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **machine(), "threads": threads}
    atomic_write_json(TIMINGS, timings)  # after every stage: an interrupted repro keeps what finished
    atomic_write_text(TIMINGS_TABLE, timings_table(timings, runs))


def table_stages(plan: dict) -> dict[str, set[str]]:
    """Every stage each table needs (shared ones, such as a decomposition, in each table that reads them)."""
    needs: dict[str, set[str]] = {}
    for key, entry in plan["collected"].items():
        table, name = entry["table"], entry["name"]
        stages = needs.setdefault(table, {"fetch_data", "build_base", f"tables@{table}"})
        stages.add(f"collect@{key}")
        if name.startswith("base-"):
            stages.add(f"evaluate_base@{name[len('base-'):]}")
            continue
        run = plan["runs"][name]
        stages.add(f"train@{name}")
        if any(path.startswith("results/eval/") for path in entry["inputs"]):  # the table reads lm-eval's scores
            stages |= {f"merge@{name}", f"evaluate@{name}"}
        if run["start"].startswith("models/init/"):
            stages.add(f"decompose@{run['start'][len('models/init/'):]}")
        if run["start"] == "models/encoder":
            stages.add("build_encoder")
    return needs


def timings_table(timings: dict, plan: dict) -> str:
    """results/timings.md: what each kind of stage and each table costs, from the recorded times;
    a stage never timed counts as the median of its kind on the same sequence (else of its kind)."""
    recorded = timings.get("stages", {})
    seconds = stage_seconds(timings, sequence_of(plan))
    by_kind: dict[str, list[float]] = {}
    for name, entry in recorded.items():
        by_kind.setdefault(kind(name), []).append(entry["seconds"])
    kinds = []
    for name, values in sorted(by_kind.items(), key=lambda item: -sum(item[1])):
        entries = [entry for stage, entry in recorded.items() if kind(stage) == name]
        loads = [entry["load_average_1min"] for entry in entries]
        threads = sorted({str(entry["threads"]) for entry in entries})
        kinds.append([name, len(values), f"{statistics.mean(values):.0f}", f"{min(values):.0f}", f"{max(values):.0f}",
                      f"{sum(values) / 60:.0f}", "/".join(threads), f"{min(loads):.1f}-{max(loads):.1f}"])
    needs = table_stages(plan)
    tables = []
    for name, stages in [*needs.items(), ("every table", set().union(*needs.values()) | {"report"})]:
        timed = [stage for stage in stages if stage in recorded]
        total = sum(seconds(stage) for stage in stages)
        since = min((recorded[stage]["finished"][:10] for stage in timed), default="-")
        tables.append([name, len(stages), len(timed), since, f"{total / 3600:.1f}", f"{total / 7200:.1f}"])
    cores = {entry.get("cores") for entry in recorded.values()}
    cpus = Counter(entry.get("cpu", "not recorded") for entry in recorded.values())
    return "\n".join([
        "# What the stages cost",
        "",
        "Generated by `stages/repro.py` from [timings.json](timings.json) after every stage it runs: each",
        "stage's wall time the last time it ran, with the threads it had and the machine's 1-minute load",
        f"average then ({'/'.join(str(c) for c in sorted(cores, key=str))} cores; OpenMP waiting passively). "
        "Compare kinds only by times taken at similar load.",
        "",
        "CPUs (stages timed on each): " + "; ".join(f"{name}: {count}" for name, count in cpus.most_common()) + ". A run",
        "is bit-identical on the same kind of CPU at the same thread count; bf16 kernels on another kind",
        "(AMX, AVX512-BF16, AVX2) round differently, and its scores move within seed noise.",
        "",
        "## By kind of stage",
        "",
        markdown_table(["kind", "timed", "mean s", "min s", "max s", "total min", "threads", "load"], kinds),
        "",
        "## By table",
        "",
        "Stage time is the sum over the stages a table needs (a stage it shares with another table, such as",
        "a decomposition or the base model's scores, counts in both); a stage not timed yet counts as the",
        "median of its kind on the same sequence, else of its kind (a rough guess where `timed` is small).",
        "Two at a time (`stages/repro.py -j 2`, one thread each) takes about half of it.",
        "",
        markdown_table(["table", "stages", "timed", "timed since", "stage time h", "-j 2 wall h"], tables),
        "",
    ])


# A stage command ended by SIGKILL or SIGTERM was stopped from outside (out of memory, preempted,
# its node lost), not by its own error: run it again, like a lost worker.
KILLED = {-9, -15, 128 + 9, 128 + 15}


class WorkerLost(Exception):
    pass


def run_commands(commands: list[str], cwd: str, env: dict) -> tuple[int, float]:
    """A stage's commands, one after the other, where a worker runs them: (exit code, seconds).
    Module-level, so a submitit worker can unpickle it."""
    began = time.monotonic()
    for command in commands:
        code = subprocess.run(command, shell=True, cwd=cwd, env=env).returncode
        if code in KILLED:
            raise WorkerLost(f"{command.split()[1] if ' ' in command else command} was killed (exit {code})")
        if code:
            return code, time.monotonic() - began
    return 0, time.monotonic() - began


class Workers:
    """Where stages run: threads of this process starting local commands, or submitit jobs, on
    this machine (cluster "local": one process per job) or on Slurm (cluster "slurm": one job per
    stage, on a shared filesystem that holds the repository and its DVC cache). Handles answer
    ``done()`` and ``result()`` (an exception means the worker was lost, not that the stage failed)."""

    def __init__(self, kind: str, jobs: int, threads: int, folder: str = ".cache/submitit"):
        self.kind = kind
        if kind == "threads":
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=jobs)
        else:
            import submitit

            cluster = None if kind == "submitit" else kind.split("-", 1)[1]  # submitit: slurm if there is one, else local
            self.pool = submitit.AutoExecutor(folder=folder, cluster=cluster)
            self.pool.update_parameters(timeout_min=24 * 60, cpus_per_task=threads, name="adaptlab")

    def submit(self, commands: list[str], cwd: str, env: dict):
        return self.pool.submit(run_commands, commands, cwd, env)

    def close(self) -> None:
        if self.kind == "threads":
            self.pool.shutdown(wait=True)


def run_parallel(targets: list[str], jobs: int, timings: dict, runs: dict, executor: str = "threads", retries: int = 1,
                 allow_missing: bool = False, keep_going: bool = False) -> int:
    """Run the stages ``dvc repro targets`` would run, ``jobs`` at a time on ``executor``,
    recording each in dvc.lock and the cache as DVC does. A stage whose worker is lost (killed,
    preempted) is started again, up to ``retries`` times; a stage that fails stops the run (running
    stages finish, nothing else starts), or with ``keep_going`` only the stages downstream of it
    (DVC's --keep-going). SIGUSR1 stops it like a failure, to go on later with the same command.
    ``runs`` is params.yaml's run plan, for results/timings.md. Returns 0, or 1 after a failure."""
    import signal

    from dvc.repo import Repo

    threads = max(1, cores() // jobs)
    env = dict(os.environ, ADAPTLAB_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    workers = Workers(executor, jobs, threads)

    def start(stage) -> None:
        commands = stage.cmd if isinstance(stage.cmd, list) else [stage.cmd]
        running[stage] = workers.submit(commands, stage.wdir, env)

    with Repo(".") as repo, repo.lock:
        plan = Plan(repo, targets, allow_missing)
        steps = sorted(plan.steps, key=lambda stage: -plan.depth[stage])  # stable: DVC's order within a depth
        done: set = set()
        running: dict = {}
        lost: dict = {}
        failures: list = []  # stages that failed, in the order they failed
        stopped: set = set()  # the failed stages and those downstream of one (not run)
        draining = False
        to_run, finished_count = plan.to_run(), 0

        def drain(signum, frame) -> None:
            nonlocal draining
            draining = True
            print(f"SIGUSR1: letting the {len(running)} running stage(s) finish, starting no more", flush=True)

        previous = signal.signal(signal.SIGUSR1, drain)
        try:
            def stopping() -> bool:
                return draining or bool(failures and not keep_going)

            while len(done) + len(stopped) < len(steps) and not (stopping() and not running):
                for stage in steps:
                    if stage not in stopped and plan.upstream[stage] & stopped:
                        stopped.add(stage)
                    if stopping() or len(running) >= jobs or stage in done or stage in running or stage in stopped \
                            or not plan.upstream[stage] <= done:
                        continue
                    if stage not in plan.forced and not plan.changed(stage):  # unchanged, or its upstream ran
                        done.add(stage)                                       # but left its inputs as they were
                        continue
                    print(f"Running stage '{stage.addressing}' ({threads} thread{'s' * (threads > 1)}, {executor}):", flush=True)
                    stage.remove_outs(ignore_remove=False, force=False)
                    start(stage)
                finished = [stage for stage, handle in running.items() if handle.done()]
                if not finished:
                    time.sleep(0.5)
                for stage in finished:
                    handle = running.pop(stage)
                    try:
                        code, seconds = handle.result()
                    except Exception as err:  # the worker died: its stage did not finish, run it again
                        lost[stage] = lost.get(stage, 0) + 1
                        if lost[stage] > retries:
                            print(f"ERROR: stage '{stage.addressing}' lost its worker {lost[stage]} times ({err})", file=sys.stderr)
                            failures.append(stage)
                            stopped.add(stage)
                        else:
                            print(f"stage '{stage.addressing}' lost its worker ({type(err).__name__}): running it again", flush=True)
                            stage.remove_outs(ignore_remove=False, force=False)
                            start(stage)
                        continue
                    if code:
                        print(f"ERROR: stage '{stage.addressing}' failed with exit code {code}", file=sys.stderr, flush=True)
                        failures.append(stage)
                        stopped.add(stage)
                        continue
                    stage.save()
                    stage.commit()
                    stage.dump(update_pipeline=False)
                    record(timings, stage.addressing, seconds, threads, runs)
                    done.add(stage)
                    finished_count += 1
                    left = [step.addressing for step in to_run if step not in done]
                    print(f"Finished stage '{stage.addressing}' in {seconds:.0f} s ({finished_count} done, {len(left)} to go, "
                          f"about {estimate(left, timings, runs) / jobs / 60:.0f} min left)", flush=True)
            if failures:
                names = ", ".join(stage.addressing for stage in failures)
                rest = len(steps) - len(done) - len(stopped)
                print(f"ERROR: {len(failures)} stage(s) failed ({names}): {finished_count} finished and recorded, "
                      f"{len(stopped) - len(failures)} not run because they need a failed one" + (f", {rest} not started" if rest else "")
                      + "; fix the failure and run the same command to go on from here", file=sys.stderr, flush=True)
            elif draining:
                print(f"stopped on request after {finished_count} stage(s); the same command goes on from here", flush=True)
        finally:
            signal.signal(signal.SIGUSR1, previous)
            workers.close()
    return 1 if failures else 0


def run_dvc(targets: list[str], timings: dict, runs: dict, keep_going: bool = False) -> int:
    """``dvc repro targets``, its output passed through; each stage's wall time recorded. A thread
    stamps every line as it arrives: recording a stage takes a moment, and lines read after it
    (a short stage's start and end) would otherwise be timed by when they were read."""
    import queue
    import threading

    process = subprocess.Popen(["dvc", "repro", *(["--keep-going"] if keep_going else []), *targets],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put((time.monotonic(), line))
        lines.put((time.monotonic(), None))

    threading.Thread(target=read, daemon=True).start()
    current, began = None, 0.0

    def finish(at: float) -> None:
        if current is not None:
            record(timings, current, at - began, os.environ.get("ADAPTLAB_THREADS", "auto"), runs)

    while True:
        at, line = lines.get()
        if line is None:
            break
        sys.stdout.write(line)
        sys.stdout.flush()
        found = RUNNING.match(line)
        if found:
            finish(at)
            current, began = found.group(1), at
    code = process.wait()
    if code == 0:
        finish(at)
    return code


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="stages to reproduce (default: all)")
    parser.add_argument("--dry", action="store_true", help="print what would run and the estimate, run nothing")
    parser.add_argument("--timings", action="store_true", help="only write results/timings.md from results/timings.json")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="stages run at once (default 1: plain `dvc repro`)")
    parser.add_argument("--executor", default="threads", choices=["threads", "submitit", "submitit-local", "submitit-slurm"],
                        help="where -j stages run: this machine's threads, or submitit jobs (Slurm when it finds one)")
    parser.add_argument("--retries", type=int, default=1, help="times a stage whose worker was lost is started again")
    parser.add_argument("--allow-missing", action="store_true",
                        help="do not re-run a recorded stage only because its outputs are not on this machine (see above)")
    parser.add_argument("-k", "--keep-going", action="store_true",
                        help="after a stage fails, run every stage that does not need it (DVC's flag; default: stop)")
    args = parser.parse_args(argv)
    if not Path("dvc.yaml").is_file():
        fail("no dvc.yaml here: run this from the repository's root")
    params = load_params()
    check_plan(params, plan_path(None))
    timings = read_json(TIMINGS) if TIMINGS.is_file() else {}
    runs = build_plan(params)  # results/timings.md's tables, rewritten after every stage
    if args.timings:
        atomic_write_text(TIMINGS_TABLE, timings_table(timings, runs))
        print(f"wrote {TIMINGS_TABLE}")
        return
    stages = stages_to_run(args.targets, args.allow_missing)
    counts = ", ".join(f"{n} {k}" for k, n in Counter(kind(s) for s in stages).items())
    if args.jobs < 1:
        fail(f"-j must be at least 1, got {args.jobs}")
    minutes = estimate(stages, timings, runs) / 60
    pace = "" if args.jobs == 1 else f", less with {args.jobs} at a time"
    source = ("results/timings.json: the times these stages took before, for new ones the median of their kind on their sequence"
              if timings.get("stages") else "no results/timings.json yet: a first guess per kind of stage")
    print(f"{len(stages)} stages to run ({counts or 'none'}): about {minutes:.0f} min one at a time{pace} ({source})",
          flush=True)
    if args.dry or not stages:
        return
    if args.jobs == 1 and args.executor == "threads" and not args.allow_missing:
        code = run_dvc(args.targets, timings, runs, args.keep_going)
    else:  # DVC's own --allow-missing would not remake a missing input a running stage needs
        code = run_parallel(args.targets, args.jobs, timings, runs, args.executor, args.retries, args.allow_missing,
                            args.keep_going)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
