"""CorDA: Context-Oriented Decomposition Adaptation (Yang et al., NeurIPS 2024).

Update rule: for every target linear layer W (out x in), C = mean XᵀX over calibration samples
of a context; SVD(W·C) = U Σ Vᵀ, so W = [U Σ Vᵀ C⁻¹] (C damped: + d·mean(diag C)·I until it
inverts safely). KPA, knowledge-preserved adaptation (peft "kpm"; calibrated on a knowledge QA
task's questions), puts the r SMALLEST components in the trainable adapter,
B = U_r Σ_r^½, A = Σ_r^½ (Vᵀ C⁻¹)_r, and freezes the rest, keeping the directions the world
knowledge context uses most; IPA, instruction-previewed adaptation (peft "ipm", --first_eigen;
calibrated on the fine-tuning task), puts the r LARGEST. The frozen base is the residual
W − B·A, so the model is unchanged at step 0; then AdamW on A and B as in LoRA
(h = W_res·x + (alpha/r)·B·A·x).

The decomposition is its own step (methods/build_corda.py, run by stages/decompose.py from the
method's `decompose:` params); this script trains from what it saved:
    python methods/corda4sft.py --init models/init/corda_kpa
--init's init.json names the decomposed model (cfg.base_model: the residual weights) and the
method (corda_kpa, corda_ipa: the params.yaml section, hence the run's row); --method_name
overrides it. The initial adapter <base_model>/corda_init is loaded trainable with plain peft.
Saved adapters are plain LoRA adapters relative to the decomposed model: merge them onto it
(stages/merge.py --run runs/<row> reads it from train_config.json), never onto the original base.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from stages.core.errors import AdaptlabError, fail
from stages.core.io import read_json
from stages.core.sft import Method, main

# The params.yaml section (= the row) when neither --method_name nor --init names one.
# methods/corda_kpa4sft.py and corda_ipa4sft.py (what dvc.yaml runs) pass their own.
DEFAULT_NAME = "corda_kpa"


def build(model, cfg, ctx):
    from peft import LoraConfig, PeftModel

    init = Path(cfg.base_model) / "corda_init"
    if not (init / "adapter_config.json").is_file():
        fail(f"'{cfg.base_model}' is not a CorDA decomposed model (no corda_init/adapter_config.json): run "
             f"`python stages/decompose.py --method {cfg.method} --out models/init/{cfg.method}` and pass --init "
             f"models/init/{cfg.method}")
    config = LoraConfig.from_pretrained(str(init))
    # The adapter's shape was fixed by the decomposition: params that disagree mean a stale model.
    expected = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": config.target_modules}
    for key, saved in expected.items():
        wanted = getattr(cfg, key, None)
        if wanted is None:
            continue
        same = set(wanted) == set(saved) if key == "target_modules" else float(wanted) == float(saved)
        if not same:
            fail(f"methods.{cfg.method}.{key} is {wanted} but the decomposed model in {cfg.base_model} was built "
                 f"with {key} {sorted(saved) if key == 'target_modules' else saved}: rerun its decompose stage "
                 f"(params decompose.args) or make the two agree")
    if getattr(cfg, "lora_dropout", None) is not None:
        config.lora_dropout = cfg.lora_dropout
    return PeftModel.from_pretrained(model, str(init), config=config, is_trainable=True)


def corda_method(name: str) -> Method:
    return Method(name, build, doc=__doc__)


METHOD = corda_method(DEFAULT_NAME)


def method_name(argv: Sequence[str], default: str = DEFAULT_NAME) -> tuple[str, list[str]]:
    """The params section to run: --method_name, else the method recorded in --init's init.json,
    else ``default``. Returns it and argv without --method_name."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method_name", default=None)
    pre.add_argument("--init", default="")
    known, _ = pre.parse_known_args(argv)
    rest, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--method_name":
            skip = True
        elif not arg.startswith("--method_name="):
            rest.append(arg)
    recorded = None
    init_file = Path(known.init) / "init.json" if known.init else None
    if init_file is not None and init_file.is_file():
        recorded = read_json(init_file).get("method")
    if known.method_name and recorded and known.method_name != recorded:
        fail(f"--method_name {known.method_name} but --init {known.init} was decomposed for {recorded}")
    return known.method_name or recorded or default, rest


def run(argv: Sequence[str] | None = None, default: str = DEFAULT_NAME) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        name, rest = method_name(argv, default)
    except AdaptlabError as err:  # before main's own wrapper: same one-line error, exit 2
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    main(corda_method(name), rest)


if __name__ == "__main__":
    run()
