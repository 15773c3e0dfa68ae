"""vlmscope: find circuits inside vision-language models with sparse dictionaries."""

from __future__ import annotations

__version__ = "0.1.0"
