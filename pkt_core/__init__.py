"""pkt_core: the transfer method of "Seeking Neural Nuggets" as plain functions on tensors and models.

No Prefect and no store in here: usable from a notebook.
"""
import os

# Torch's OpenMP threads spin while they wait for each other. On a busy machine a spinning thread burns
# the time slice its partner needs: measured here with 2 threads at load ~7 on 2 cores, 128 LoRA steps
# took 173 s spinning, 10 s passive, 11 s on one thread (bench/threads.py). Read by OpenMP when torch
# loads, so it acts only if pkt is imported first; a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
