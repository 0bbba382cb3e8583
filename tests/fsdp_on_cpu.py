"""Runs a script (argv[1:]) under ``accelerate launch --use_fsdp`` on CPU processes.

accelerate offers FSDP only on accelerators: with ACCELERATE_USE_CPU its state becomes MULTI_CPU and
the FSDP plugin is dropped. torch's FSDP2 (``fully_shard``) does run on CPU over gloo, so this shim
creates the process group on the CPU first and then tells accelerate's state it is multi-device,
which makes it take its FSDP2 branch: the script's model is sharded by the same accelerate and torch
code as on GPUs. Tests only.
"""

import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

state = PartialState(cpu=True)  # gloo, from torchrun's environment
state.distributed_type = DistributedType.MULTI_GPU
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
