"""Prints this process's rank and world size as accelerate sees them, after moeify's launch check
(launched by tests/test_distributed.py through `accelerate launch --config_file cpu_2proc.yaml`)."""

import torch.distributed as dist
from accelerate import Accelerator

from moeify.integrations.accelerate import check_launch

accelerator = Accelerator()
check_launch(accelerator)
assert accelerator.num_processes == 2 and dist.get_world_size() == 2, accelerator.num_processes
print(f"<rank {accelerator.process_index} of {accelerator.num_processes} on {dist.get_backend()}>", flush=True)
accelerator.wait_for_everyone()
accelerator.end_training()
