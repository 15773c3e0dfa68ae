"""Sparse dictionaries (SAEs, transcoders, cross-layer transcoders): tensors in, tensors out.

This layer knows nothing about models: a trainer feeds it activations, a replacement model and
attribution code read its weights. Sparse codes have one format everywhere (`SparseCodes`:
values and indices [N, K], zero values are padding); see activations.py.
"""

from __future__ import annotations

from vlmscope.dictionaries.activations import (
    ACTIVATIONS,
    BatchTopK,
    JumpReLU,
    SparseActivation,
    SparseCodes,
    TopK,
    build_activation,
)
from vlmscope.dictionaries.clt import CLTForwardOutput, CrossLayerTranscoder
from vlmscope.dictionaries.coder import (
    ForwardOutput,
    NonFiniteError,
    SparseCoder,
    check_finite,
    fvu,
)
from vlmscope.dictionaries.config import SparseCoderConfig
from vlmscope.dictionaries.io import (
    DictionaryFormatError,
    TensorChecks,
    export_circuit_tracer,
    export_saelens,
    load_dictionaries,
    save_dictionaries,
)
from vlmscope.dictionaries.kernels import dense_decode, sparse_decode

__all__ = [
    "ACTIVATIONS",
    "BatchTopK",
    "CLTForwardOutput",
    "CrossLayerTranscoder",
    "DictionaryFormatError",
    "ForwardOutput",
    "JumpReLU",
    "NonFiniteError",
    "SparseActivation",
    "SparseCoder",
    "SparseCoderConfig",
    "SparseCodes",
    "TensorChecks",
    "TopK",
    "build_activation",
    "check_finite",
    "dense_decode",
    "export_circuit_tracer",
    "export_saelens",
    "fvu",
    "load_dictionaries",
    "save_dictionaries",
    "sparse_decode",
]
