"""GORP, continual learning with gradient low-rank projection (Wang et al., ACL 2025): the script a gorp row runs.

The method, its update rule and options are in gorp4cl.py (the pipeline runs methods/<name>4sft.py):
    python methods/gorp4sft.py --sequence gorp_order1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gorp4cl.py beside it, however this file is loaded

from gorp4cl import METHOD  # noqa: E402

from stages.core.sft import main  # noqa: E402

if __name__ == "__main__":
    main(METHOD)
