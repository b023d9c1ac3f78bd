"""Code that runs inside Triton's Python backend.

The `model.py` files in the model repository stay thin: they turn tensors into plain values, call
the functions here, and turn results or errors back into responses. Everything here is testable
without Triton.
"""
