"""Planners: predict memory and throughput of a configuration before any GPU is used.

`memory.py` is the shared accounting core (model shapes from a config alone, byte lines,
tables); `training.py` plans `vlmscope train` on N GPUs. `vlmscope plan` serves them
(`cli.py`); an attribution planner can add its module and flags beside them.
"""
