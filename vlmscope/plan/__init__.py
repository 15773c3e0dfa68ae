"""Memory and time planners: what a job will hold on the device and the host, part by part,
before it runs, and the largest batch that fits.

`memory.py` is the shared accounting core (parts, budgets, parameter bytes of a model built
on the meta device); `attribution.py` plans `vlmscope attribute`. `vlmscope plan` exposes them
(`--attribute`; a training mode can sit beside it, see cli.py).
"""
