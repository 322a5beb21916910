"""Moving fjt state to and from other frameworks.

``fjt.interop.torch``: PyTorch modules and ``state_dict``s <-> Flax variables, strict by
default, layouts known and never guessed, and back to the source's own keys
(``to_state_dict(variables, like=report)``). Beside it: ``layouts`` (how torch axes map onto
Flax leaves), ``matching`` (which torch module fills which Flax module), ``files``
(``.safetensors`` and weights-only ``.pt`` files), ``torch_models`` (PyTorch twins of fjt's
models) and ``convert`` (``scripts/convert.py``). Importing them needs no PyTorch, but for
``torch_models``; only the functions that make or read torch tensors import it, and say how to
install it when it is missing.
"""
