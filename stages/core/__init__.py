"""The shared core that every pipeline stage and every method script imports.

Offline by default: nothing here reaches a model or dataset hub unless the user names a hub id
and has a network. The environment flags below make transformers, datasets and lm-eval fail
fast instead of hanging on a hub that cannot be reached.

Threads, in one place for every stage (this package is imported before torch): as many as the
cores this process may run on (``os.sched_getaffinity``), or ``ADAPTLAB_THREADS``; OpenMP's
idle threads wait passively instead of spinning, which is what makes torch 20-30x slower when
another process competes for the cores (a LoRA step: 44.6 s spinning, 3.3 s passive).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
THREADS = int(os.environ.get("ADAPTLAB_THREADS") or len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("MKL_NUM_THREADS", str(THREADS))
