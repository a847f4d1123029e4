"""Triton twins of fastcascade's C++ ops, one module per op family (the same stems as csrc/ and
fastcascade/_ops/). Importing a module defines its ops ``torch.ops.fastcascade.<name>_triton`` (same
schemas as the C++ ops); fastcascade._ops.load_triton_ops imports them all and registers their fake
kernels and autograd. Every Triton op launches through _common.launch, under its tensors' device.
"""
