"""Edge inference: members and prefixes as ONNX graphs, served by onnxruntime without JAX.

* :mod:`mamba_pkd.edge.onnx_lower` (needs ``numpy`` and ``onnx``): lowers one
  member (teacher or student), or a prefix as one graph, to an ``onnx.ModelProto``.
* :mod:`mamba_pkd.edge.onnx_export` (needs ``onnx``; ``onnxruntime`` for int8):
  the bundle of ``python -m mamba_pkd.export --format=onnx``.
* :mod:`mamba_pkd.edge.runtime` (needs ``numpy`` and ``onnxruntime``, no JAX):
  runs a bundle as an anytime ensemble (prefixes, budgets, the early-exit cascade),
  ``python -m mamba_pkd.predict --runtime=onnx``.

All need the ``edge`` extra (``pip install mamba-pkd[edge]``); the core package
imports this subpackage only inside ``export --format=onnx`` and ``predict
--runtime=onnx``.
"""
