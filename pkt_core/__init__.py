"""pkt_core: the transfer method of "Seeking Neural Nuggets" as plain functions on tensors and models.

No Prefect and no store in here: usable from a notebook.
"""
__version__ = "0.1.0"
