"""Memory and time planners: what a job will hold on the device and the host, part by part,
before it runs (no GPU needed), and the largest batch that fits.

`memory.py` is the shared accounting core (parts, budgets, model shapes and parameter bytes of
a model built on the meta device); `attribution.py` plans `vlmscope attribute` and
`training.py` plans `vlmscope train` on N GPUs. `vlmscope plan` exposes them (`cli.py`).
"""
