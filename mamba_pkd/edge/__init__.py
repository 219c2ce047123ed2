"""Edge inference: members as ONNX graphs, served by onnxruntime without JAX.

* :mod:`mamba_pkd.edge.onnx_lower` (needs ``numpy`` and ``onnx``): lowers one
  member (teacher or student) to an ``onnx.ModelProto``.
* :mod:`mamba_pkd.edge.runtime` (needs ONLY ``numpy`` and ``onnxruntime``):
  runs the lowered members as an anytime ensemble (prefix sums, early exit).

Both need the ``edge`` extra (``pip install mamba-pkd[edge]``); nothing in the
core package imports this subpackage.
"""
