"""`vlmscope serve`: the local graph explorer and feature cards (server + static page)."""
