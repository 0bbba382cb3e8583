"""LoRETTA's adapter form, --tuning_type loretta_adp, as a row of its own (params.yaml:
methods.loretta_adp). The method, its update rule and options are in loretta4sft.py:
    python methods/loretta_adp4sft.py --sequence default
is `python methods/loretta4sft.py --tuning_type loretta_adp` with its own params section and run folders.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loretta4sft.py beside it, however this file is loaded

from loretta4sft import METHOD as LORETTA  # noqa: E402

from stages.core.sft import main  # noqa: E402

METHOD = dataclasses.replace(LORETTA, name="loretta_adp")

if __name__ == "__main__":
    main(METHOD)
