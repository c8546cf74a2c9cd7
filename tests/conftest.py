"""Test-session settings shared by every test module."""

import torch

# The suite runs many tiny networks: one intra-op thread is much faster for them than contending threads,
# and keeps the timing stable on the 2-core CI machine.
torch.set_num_threads(1)
