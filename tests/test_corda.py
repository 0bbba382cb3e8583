"""CorDA on the tiny model: the decomposition (methods/build_corda.py), training from it
(methods/corda4sft.py), merging, the covariance cache, the full-decomposition comparison and the
one-line errors.

KPA is built in-process (and cached); IPA goes through stages/decompose.py exactly as DVC runs it,
so the params' `decompose:` args (a target_modules list included) reach build_corda.py's command line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from methods import build_corda as bc
from methods import corda4sft
from stages.core.batches import response_loss
from stages.core.models import load_model, load_tokenizer
from stages.core.sft import Trainer, build_config

import pytest
import torch
from conftest import ROOT, check, logits, markdown_rows, probe_batch, run_script, tiny_params, write_hamlet_wheel, write_params

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # tiny Llama: 64x64, 32x64, 128x64, 64x128
R, ALPHA = 4, 8
CALIB = {"kpa": ("gen", []), "ipa": ("mc", ["--first_eigen"])}  # KPA: questions of a QA task; IPA: the task
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYER = "model.layers.0.self_attn.q_proj"




def build_args(kind: str, *extra) -> list[str]:
    dataset, flags = CALIB[kind]
    return ["--model_id", "models/base", "--r", str(R), "--lora_alpha", str(ALPHA), "--calib_dataset", dataset,
            "--calib_loader_size", "24", "--target_modules", *TARGETS, *flags, *extra]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small for threads; on a busy 2-core machine they only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corda_method_params(kind: str) -> dict:
    dataset, flags = CALIB[kind]
    args = {"r": R, "lora_alpha": ALPHA, "calib_dataset": dataset, "calib_loader_size": 24, "first_eigen": bool(flags),
            "target_modules": TARGETS, "use_cache": True, "cache_dir": ".cache/corda"}
    return {"script": "corda4sft.py", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": TARGETS,
            "decompose": {"script": "build_corda.py", "args": args}}


@pytest.fixture(scope="module")
def corda_project(project, tmp_path_factory):
    params = tiny_params(methods={"corda_kpa": corda_method_params("kpa"), "corda_ipa": corda_method_params("ipa")},
                         sequences={"default": ["mc", "gen"], "one": ["mc"]})
    write_params(project / "params_corda.yaml", params)
    return project


@pytest.fixture(scope="module")
def kpa(corda_project, tmp_path_factory):
    """KPA built in-process with --use_cache: (model folder, cache folder)."""
    cache = tmp_path_factory.mktemp("corda-cache")
    out = corda_project / "models" / "corda_kpa"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(corda_project)
        bc.main(build_args("kpa", "--use_cache", "--cache_dir", str(cache), "--save_model", "--save_path", str(out)))
    return out, cache


@pytest.fixture(scope="module")
def ipa(corda_project, script_env):
    """IPA through the decompose stage, as dvc.yaml runs it: models/init/corda_ipa."""
    check(run_script("stages/decompose.py", "--method", "corda_ipa", "--out", "models/init/corda_ipa",
                     "--params", "params_corda.yaml", cwd=corda_project, env=script_env))
    init = corda_project / "models" / "init" / "corda_ipa"
    return corda_project / json.loads((init / "init.json").read_text())["base_model"]


@pytest.fixture(scope="module")
def probe(corda_project):
    return probe_batch(corda_project)



def decomposed(folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(folder), str(folder / "corda_init"))


def weights(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): p.detach() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- the decomposition


@pytest.mark.parametrize("kind", ["kpa", "ipa"])
def test_decomposed_model_reproduces_the_original(kind, request, corda_project, probe):
    folder = request.getfixturevalue(kind)
    folder = folder[0] if kind == "kpa" else folder
    _, _, batch = probe
    original = load_model(corda_project / "models" / "base")
    torch.testing.assert_close(logits(decomposed(folder), batch), logits(original, batch), atol=1e-5, rtol=1e-5)
    residual, base = weights(load_model(folder)), weights(original)
    for name, tensor in base.items():
        changed = not torch.equal(residual[name], tensor)
        assert changed == any(f".{t}." in name for t in TARGETS), name  # only the targets became residuals
    record = json.loads((folder / "corda_build.json").read_text())
    assert record["corda_method"] == {"kpa": "kpm", "ipa": "ipm"}[kind] and record["max_logit_difference"] < 1e-4
    adapter = json.loads((folder / "corda_init" / "adapter_config.json").read_text())
    assert adapter["init_lora_weights"] is True and (adapter["r"], adapter["lora_alpha"]) == (R, ALPHA)


def own_covariance(model, layer_name: str, samples: list[list[int]]) -> torch.Tensor:
    """C of one layer, computed independently of peft and build_corda: each sample's inputs
    divided by their maximum, mean of XᵀX over samples (float64)."""
    layer = dict(model.named_modules())[layer_name]
    total = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)

    def hook(module, inputs, output):
        x = inputs[0][0].double() / inputs[0].max().abs()
        total.add_(x.T @ x)

    handle = layer.register_forward_hook(hook)
    with torch.no_grad():
        for ids in samples:
            model(input_ids=torch.tensor([ids]))
    handle.remove()
    return total / len(samples)


def damped(c: torch.Tensor) -> torch.Tensor:
    eye, damp = torch.eye(c.shape[0], dtype=c.dtype), 0.01
    while torch.dist((c + eye * c.diag().mean() * damp) @ torch.linalg.inv(c + eye * c.diag().mean() * damp), eye) >= 0.05:
        damp *= 2
    return c + eye * c.diag().mean() * damp


@pytest.mark.parametrize("kind", ["kpa", "ipa"])
def test_adapter_holds_the_smallest_kpa_or_largest_ipa_components(kind, request, corda_project, monkeypatch):
    from safetensors.torch import load_file

    folder = request.getfixturevalue(kind)
    folder = folder[0] if kind == "kpa" else folder
    monkeypatch.chdir(corda_project)
    model = load_model("models/base")
    args = bc.parse_args(build_args(kind))
    bc.check_args(args)
    samples = bc.calibration_samples(args, load_tokenizer("models/base"))
    c = damped(own_covariance(model, LAYER, samples))
    w = dict(model.named_modules())[LAYER].weight.detach().double()
    sigma = torch.linalg.svdvals(w @ c)  # descending

    tensors = load_file(str(folder / "corda_init" / "adapter_model.safetensors"))
    b = next(v for k, v in tensors.items() if LAYER.removeprefix("model.") in k and "lora_B" in k).double()
    a = next(v for k, v in tensors.items() if LAYER.removeprefix("model.") in k and "lora_A" in k).double()
    delta = (ALPHA / R) * b @ a
    in_adapter = torch.linalg.svdvals(delta @ c)[:R]
    expected = sigma[-R:] if kind == "kpa" else sigma[:R]
    torch.testing.assert_close(in_adapter, expected, rtol=2e-3, atol=1e-4 * float(sigma[0]))
    # The residual holds the other components.
    residual = dict(load_model(folder).named_modules())[LAYER].weight.detach().double()
    kept = torch.linalg.svdvals(residual @ c)[:len(sigma) - R]
    torch.testing.assert_close(kept, sigma[:-R] if kind == "kpa" else sigma[R:], rtol=2e-3, atol=1e-4 * float(sigma[0]))
    if kind == "kpa":
        assert in_adapter.max() <= kept.min() * (1 + 1e-3)
    else:
        assert in_adapter.min() >= kept.max() * (1 - 1e-3)


def test_covariance_equals_peft_hook(corda_project, monkeypatch):
    """build_corda's fast covariance pass computes exactly peft's calib_cov_distribution."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution

    monkeypatch.chdir(corda_project)
    model = load_model("models/base")
    args = bc.parse_args(build_args("ipa"))
    bc.check_args(args)
    samples = bc.calibration_samples(args, load_tokenizer("models/base"))
    layers = bc.target_layers(model, TARGETS)
    ours = bc.corda_covariance(model, layers, samples, flush_rows=50)
    config = LoraConfig(r=R, target_modules=TARGETS, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))
    with torch.no_grad():
        calib_cov_distribution(model, config, lambda: [model(input_ids=torch.tensor([s])) for s in samples], None, None)
    for name, layer in layers.items():
        torch.testing.assert_close(ours[name], layer.covariance_matrix, rtol=1e-5, atol=1e-6 * float(layer.covariance_matrix.abs().max()))


def test_second_run_with_use_cache_runs_no_model(kpa, corda_project, monkeypatch, capsys):
    from safetensors.torch import load_file

    first, cache = kpa
    files = sorted(cache.glob("*.pt"))
    assert [f.name.split("_")[-1] for f in files] == ["covariance.pt", "eigens.pt"]
    assert all("models-base_gen_n24_kpm_" in f.name for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]

    def no_calibration(*args, **kwargs):
        raise AssertionError("the covariance was recomputed")

    monkeypatch.setattr(bc, "corda_covariance", no_calibration)
    monkeypatch.chdir(corda_project)
    again = corda_project / "models" / "corda_kpa_again"
    bc.main(build_args("kpa", "--use_cache", "--cache_dir", str(cache), "--save_model", "--save_path", str(again)))
    assert "reused" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    for name, tensor in load_file(str(first / "corda_init" / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(again / "corda_init" / "adapter_model.safetensors"))[name])
    # Another rank needs a new SVD crop but the same covariance: still no model run.
    argv = build_args("kpa", "--use_cache", "--cache_dir", str(cache))
    argv[argv.index("--r") + 1] = "2"
    bc.main(argv)
    assert len(list(cache.glob("*_r2_eigens.pt"))) == 1 and [f.stat().st_mtime_ns for f in files] == mtimes


def test_a_cache_made_by_other_code_is_not_reused(kpa, corda_project, monkeypatch, tmp_path):
    """A cache remembers the code that made it: after an edit to build_corda.py (DVC re-runs the
    stage), the covariance is computed again, not read back from what the old code wrote."""
    cache = tmp_path / "cache"  # a copy: the shared fixture's cache keeps its two files
    shutil.copytree(kpa[1], cache)
    edited = tmp_path / "build_corda.py"
    edited.write_bytes(Path(bc.__file__).read_bytes() + b"# edited\n")
    monkeypatch.setattr(bc, "__file__", str(edited))
    computed = []
    real = bc.corda_covariance
    monkeypatch.setattr(bc, "corda_covariance", lambda *args, **kwargs: computed.append(1) or real(*args, **kwargs))
    monkeypatch.chdir(corda_project)
    bc.main(build_args("kpa", "--use_cache", "--cache_dir", str(cache)))
    assert computed == [1]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["kpa", "ipa"])
def test_both_rows_run_the_one_script_with_their_own_section(kind, script_env):
    # methods.corda_kpa and methods.corda_ipa name corda4sft.py as their script; --method picks one.
    out = check(run_script("methods/corda4sft.py", "--method", f"corda_{kind}", "--help", cwd=ROOT, env=script_env)).stdout
    assert "corda4sft.py" in out and f"methods.corda_{kind}" in out and "Update rule" in out


def test_decompose_folder_is_the_runs_start_and_the_default_section_is_kpa(ipa, corda_project, monkeypatch):
    assert corda4sft.METHOD.default_method == "corda_kpa"
    monkeypatch.chdir(corda_project)
    cfg = build_config(corda4sft.METHOD, ["--params", "params_corda.yaml", "--method", "corda_ipa", "--sequence", "one",
                                          "--base_model", "models/init/corda_ipa"])
    assert (cfg.method, cfg.init, Path(cfg.base_model)) == ("corda_ipa", "models/init/corda_ipa", Path("models/init/corda_ipa/model"))
    assert cfg.output_dir == "runs/corda_ipa-one-s0" and cfg.work_dir == "checkpoints/corda_ipa-one-s0"


def test_corda4sft_trains_saves_reloads_and_merges(ipa, corda_project, probe, monkeypatch):
    from peft import PeftModel

    from stages import merge

    monkeypatch.chdir(corda_project)
    tokenizer, encoded, batch = probe
    tag = "corda_ipa-one"
    cfg = build_config(corda4sft.METHOD,
                       ["--params", "params_corda.yaml", "--method", "corda_ipa", "--sequence", "one", "--base_model", "models/init/corda_ipa",
                        "--steps_per_task", "12", "--lr", "1e-2", "--eval_limit", "4", "--output_dir", f"runs/{tag}",
                        "--results_dir", f"results/train/{tag}", "--work_dir", f"checkpoints/{tag}"])
    assert Path(cfg.base_model) == Path("models/init/corda_ipa/model")
    start_loss = response_loss(decomposed(ipa), encoded, tokenizer.pad_token_id)
    trainer = Trainer(corda4sft.METHOD, cfg)
    trainer.run()
    expected = logits(trainer.unwrapped, batch)

    run = corda_project / "runs" / tag
    assert json.loads((run / "train_config.json").read_text())["base_model"] == cfg.base_model
    reloaded = PeftModel.from_pretrained(load_model(cfg.base_model), str(run / "final"))
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=2e-4, rtol=1e-4)
    trained_loss = response_loss(reloaded, encoded, tokenizer.pad_token_id)
    assert trained_loss < start_loss - 0.1, f"loss {start_loss:.3f} -> {trained_loss:.3f}"

    merge.main(["--run", str(run), "--output_path", str(corda_project / "merged" / tag)])
    merged = load_model(corda_project / "merged" / tag)
    torch.testing.assert_close(logits(merged, batch), expected, atol=2e-4, rtol=1e-4)


def test_stale_decomposition_is_one_clear_error(ipa, corda_project, monkeypatch, capsys):
    monkeypatch.chdir(corda_project)
    with pytest.raises(SystemExit) as exit_info:
        corda4sft.main(corda4sft.METHOD, ["--params", "params_corda.yaml", "--method", "corda_ipa", "--base_model", "models/init/corda_ipa", "--r", "8",
                       "--output_dir", "runs/stale", "--results_dir", "results/train/stale", "--work_dir", "checkpoints/stale"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "methods.corda_ipa.r is 8" in errors[0], errors
    assert not (corda_project / "runs" / "stale").exists()


# ----------------------------------------------------------------------------- full decomposition


@pytest.fixture(scope="module")
def hamlet(tmp_path_factory):
    return write_hamlet_wheel(tmp_path_factory.mktemp("packages"))


FULL = ["--model_id", "models/base", "--mode", "full_decompose", "--calib_dataset", "hamlet", "--calib_loader_size", "4",
        "--calib_seq_len", "64", "--eval_windows", "4", "--eval_seq_len", "32", "--target_modules", *TARGETS]


def test_full_decompose_writes_three_curves(corda_project, hamlet, tmp_path, monkeypatch):
    monkeypatch.chdir(corda_project)
    monkeypatch.setenv("ADAPTLAB_PACKAGE_CACHE", str(hamlet))
    out, cache = tmp_path / "corda", tmp_path / "cache"
    argv = FULL + ["--plain", "--act_aware", "--cov_aware", "--r", "0", "8", "16", "--use_cache", "--cache_dir", str(cache)]
    bc.main(argv + ["--out_dir", str(out)])
    results = {v: json.loads((out / f"full_decompose_{v}.json").read_text()) for v in ("plain", "asvd", "corda")}
    # Again from the cache: no calibration pass, the same numbers.
    (stats_file,) = cache.glob("full_*.pt")
    mtime = stats_file.stat().st_mtime_ns
    monkeypatch.setattr(bc, "collect_stats", lambda *a, **k: pytest.fail("calibration statistics recomputed"))
    bc.main(argv + ["--out_dir", str(tmp_path / "again")])
    for variant, res in results.items():
        again = json.loads((tmp_path / "again" / f"full_decompose_{variant}.json").read_text())
        assert again["perplexity"] == pytest.approx(res["perplexity"], rel=1e-6)
    assert stats_file.stat().st_mtime_ns == mtime
    for variant, res in results.items():
        assert res["variant"] == variant and res["r"] == [0, 8, 16] and len(res["perplexity"]) == 3
        # r = 0 discards nothing: every variant reconstructs W, so the model is the base model.
        assert res["perplexity"][0] == pytest.approx(res["base_perplexity"], rel=1e-5)
        assert res["decomposed_layers"] == 2 * len(TARGETS)
        # Discarding components changes the model.
        assert res["perplexity"][2] != pytest.approx(res["base_perplexity"], rel=1e-6)
    table = (out / "full_decompose.md").read_text()
    rows = markdown_rows(table)
    assert {"Plain SVD", "ASVD (act-aware)", "CorDA (cov-aware)"} <= set(rows[0]) and any(row[0] == "16" for row in rows)
    assert (out / "full_decompose.png").read_bytes()[:8] == PNG_MAGIC


def test_full_decompose_covariance_scales_each_sample_by_its_maximum(corda_project, hamlet, monkeypatch):
    """The comparison's CorDA covariance is the reference's (calib_cov_distribution, as build mode
    and peft): every calibration window's inputs divided by their own maximum before XᵀX, also
    when windows are batched; ASVD's mean|x| stays over the raw inputs."""
    monkeypatch.chdir(corda_project)
    monkeypatch.setenv("ADAPTLAB_PACKAGE_CACHE", str(hamlet))
    args = bc.parse_args(FULL + ["--cov_aware", "--r", "0"])
    bc.check_args(args)
    model, tokenizer = load_model("models/base"), load_tokenizer("models/base")
    layers = bc.target_layers(model, TARGETS)
    samples = bc.calibration_samples(args, tokenizer, reserve=4 * 32)
    assert len(samples) >= 4 and len({len(s) for s in samples}) == 1  # equal windows: batched below
    stats = bc.collect_stats(model, layers, samples, batch_size=2)
    for name in layers:  # float32 products against float64 ones: a tolerance on the matrix's scale
        expected = own_covariance(model, name, samples)
        torch.testing.assert_close(stats[name].covariance, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    single = bc.corda_covariance(model, layers, samples)
    torch.testing.assert_close(stats[LAYER].covariance.float(), single[LAYER], rtol=1e-4, atol=1e-6)
    raw = []
    handle = dict(model.named_modules())[LAYER].register_forward_hook(lambda m, i, o: raw.append(i[0][0].double()))
    with torch.no_grad():
        for ids in samples:
            model(input_ids=torch.tensor([ids]))
    handle.remove()
    torch.testing.assert_close(stats[LAYER].mean_abs, torch.cat(raw).abs().mean(0), rtol=1e-6, atol=1e-9)


def test_each_decomposition_is_optimal_in_its_own_metric(corda_project, hamlet, monkeypatch):
    """Eckart–Young, per variant: plain SVD minimises ‖W − Ŵ‖, ASVD ‖(W − Ŵ)S‖, CorDA ‖(W − Ŵ)C‖
    over rank-(n − r) Ŵ; r = 0 reconstructs W; plain SVD's error grows with r."""
    monkeypatch.chdir(corda_project)
    monkeypatch.setenv("ADAPTLAB_PACKAGE_CACHE", str(hamlet))
    args = bc.parse_args(FULL + ["--cov_aware", "--r", "0"])
    bc.check_args(args)
    model, tokenizer = load_model("models/base"), load_tokenizer("models/base")
    layers = bc.target_layers(model, TARGETS)
    stats = bc.collect_stats(model, layers, bc.calibration_samples(args, tokenizer, reserve=4 * 32))
    for name, layer in layers.items():
        w = layer.weight.detach().double()
        parts = {v: bc.decompose(layer.weight, v, stats[name]) for v in ("plain", "asvd", "corda")}
        c, _ = bc.damped_inverse(stats[name].covariance)
        s = stats[name].mean_abs.pow(0.5) + 1e-6
        metric = {"plain": lambda d: d.norm(), "asvd": lambda d: (d * s).norm(), "corda": lambda d: (d @ c).norm()}
        for variant, part in parts.items():
            assert torch.equal(part.reconstruct(0), w)
            # The smallest components of W·M are exactly what is discarded: compare with a full SVD.
            m = {"plain": torch.eye(w.shape[1], dtype=w.dtype), "asvd": torch.diag(s), "corda": c}[variant]
            torch.testing.assert_close(part.sigma, torch.linalg.svdvals(w @ m), rtol=1e-6, atol=1e-9 * float(part.sigma[0]))
            u, sv, vh = torch.linalg.svd(w @ m, full_matrices=False)
            keep = len(sv) - 8
            reference = (u[:, :keep] * sv[:keep]) @ vh[:keep] @ torch.linalg.inv(m)
            torch.testing.assert_close(part.reconstruct(8), reference, rtol=1e-6, atol=1e-8 * float(w.abs().max()))
        errors = []
        for r in (2, 8, 16):
            diffs = {v: w - p.reconstruct(r) for v, p in parts.items()}
            for v in parts:
                assert all(metric[v](diffs[v]) <= metric[v](diffs[o]) * (1 + 1e-7) for o in parts), (name, r, v)
            errors.append(float(diffs["plain"].norm()))
        assert errors == sorted(errors) and errors[0] > 0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case", ["unknown_dataset", "rank_too_large", "missing_model", "full_rank_too_large"])
def test_bad_input_is_one_line_and_writes_nothing(case, corda_project, hamlet, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(corda_project)
    monkeypatch.setenv("ADAPTLAB_PACKAGE_CACHE", str(hamlet))
    out = tmp_path / "out"
    argv, message = {
        "unknown_dataset": (build_args("kpa", "--save_model", "--save_path", str(out)), None),
        "rank_too_large": (build_args("kpa", "--save_model", "--save_path", str(out)), "larger than the rank"),
        "missing_model": (build_args("kpa", "--save_model", "--save_path", str(out)), "does not exist"),
        "full_rank_too_large": (FULL + ["--r", "0", "40", "--out_dir", str(out)], "larger than the rank of"),
    }[case]
    if case == "unknown_dataset":
        argv[argv.index("gen")] = "nqopen"
        message = "unknown --calib_dataset 'nqopen'"
    if case == "rank_too_large":
        argv[argv.index("--r") + 1] = "40"  # v_proj is 32 x 64
    if case == "missing_model":
        argv[argv.index("models/base")] = "models/nowhere/base"
    with pytest.raises(SystemExit) as exit_info:
        bc.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], captured.err[-2000:]
    assert "Traceback" not in captured.err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_target_modules_accept_the_decompose_stage_list_form():
    assert bc.normalise_targets(["['q_proj', 'v_proj']"]) == ["q_proj", "v_proj"]
    assert bc.normalise_targets(["q_proj,v_proj", "q_proj"]) == ["q_proj", "v_proj"]
