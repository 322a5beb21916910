"""Moving fjt state to and from other frameworks.

``fjt.interop.torch``: PyTorch ``state_dict`` <-> Flax variables, and ``.safetensors`` /
weights-only ``.pt`` files. Importing it needs no PyTorch; only the functions that make or
read torch tensors import it, and say how to install it when it is missing.
"""
