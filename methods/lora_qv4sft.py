"""LoRA on q_proj and v_proj with LoRAN's released r / alpha / dropout (params.yaml:
methods.lora_qv): the baseline LoRAN's seed compares against, and LoRETTA's (the same targets).
The method, its update rule and options are in lora4sft.py; this is its own params section and
run folders:
    python methods/lora_qv4sft.py --sequence summarise
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lora4sft.py beside it, however this file is loaded

from lora4sft import METHOD as LORA  # noqa: E402

from stages.core.sft import main  # noqa: E402

METHOD = dataclasses.replace(LORA, name="lora_qv")

if __name__ == "__main__":
    main(METHOD)
