"""Models layer: adapters per family, HookedVLM, hook points, token masks and the offline zoo."""
