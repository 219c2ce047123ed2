r"""One layer's selective scan in onnxruntime: the unrolled recurrence against a log-space CumSum.

  python experiments/edge_scan_forms.py                       # s5's layer: nb=2, L=16, N=16, E=96
  python experiments/edge_scan_forms.py --shape=2,16,4,40     # s1's layer

Both graphs take ``dtA = dt * A`` and ``dBu = dt * B * u`` ([1, nb, L, N, E], the layout of
``mamba_pkd.edge.onnx_lower``'s recurrent form) and return every state ``h_t``:

* ``unrolled`` (what the export writes): ``Exp``, a ``Split`` of each input into L steps,
  ``h_t = exp(dtA_t) * h_{t-1} + dBu_t`` (2 nodes a step) and a ``Concat``;
* ``cumsum``: ``L_t = cumsum(dtA)``, ``h_t = exp(L_t) * cumsum_s(exp(-L_s) * dBu_s)``
  (6 nodes whatever L), exact in real arithmetic but ``exp(-L_s)`` overflows float32 once
  a row's summed ``dt * |A|`` passes ~88 (the script shows where).

It prints the largest difference between the two, each one's minimum over ``--rounds``
interleaved rounds of the mean time of ``--calls`` calls (one intra-op thread), and the
load average. The README's ONNX section quotes one run.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, initializers, shape) -> bytes:
  def value(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

  graph = helper.make_graph(nodes, "scan", [value("dtA"), value("dBu")], [value("H")], initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  onnx.checker.check_model(model)
  return model.SerializeToString()


def unrolled(shape) -> bytes:
  length = shape[2]
  nodes = [
      helper.make_node("Exp", ["dtA"], ["dA"]),
      helper.make_node("Split", ["dA"], [f"a{t}" for t in range(length)], axis=2),
      helper.make_node("Split", ["dBu"], [f"u{t}" for t in range(length)], axis=2),
  ]
  states = ["u0"]
  for t in range(1, length):
    nodes.append(helper.make_node("Mul", [f"a{t}", states[-1]], [f"m{t}"]))
    nodes.append(helper.make_node("Add", [f"m{t}", f"u{t}"], [f"h{t}"]))
    states.append(f"h{t}")
  nodes.append(helper.make_node("Concat", states, ["H"], axis=2))
  return _model(nodes, [], shape)


def cumsum(shape) -> bytes:
  axis = numpy_helper.from_array(np.array(2, np.int64), "axis")
  nodes = [
      helper.make_node("CumSum", ["dtA", "axis"], ["L"]),
      helper.make_node("Exp", ["L"], ["eL"]),
      helper.make_node("Reciprocal", ["eL"], ["e_minus_L"]),
      helper.make_node("Mul", ["e_minus_L", "dBu"], ["p"]),
      helper.make_node("CumSum", ["p", "axis"], ["s"]),
      helper.make_node("Mul", ["eL", "s"], ["H"]),
  ]
  return _model(nodes, [axis], shape)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="2,16,16,96", help="nb,L,N,E")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=300)
  args = parser.parse_args()
  nb, length, n, e = (int(v) for v in args.shape.split(","))
  shape = [1, nb, length, n, e]
  opts = ort.SessionOptions()
  opts.intra_op_num_threads = 1
  opts.inter_op_num_threads = 1
  sessions = {
      name: ort.InferenceSession(make(shape), opts, providers=["CPUExecutionProvider"])
      for name, make in (("unrolled", unrolled), ("cumsum", cumsum))
  }
  rng = np.random.default_rng(0)
  feed = {
      "dtA": -rng.uniform(0.0, 0.5, shape).astype(np.float32),
      "dBu": rng.normal(size=shape).astype(np.float32),
  }
  out = {name: s.run(None, feed)[0] for name, s in sessions.items()}
  print(
      f"shape {shape}: max |cumsum - unrolled| {np.abs(out['cumsum'] - out['unrolled']).max():.2e}"
      f" (max |h| {np.abs(out['unrolled']).max():.2f})"
  )
  best = {name: float("inf") for name in sessions}
  for _ in range(args.rounds):
    for name, s in sessions.items():
      s.run(None, feed)
      start = time.perf_counter()
      for _ in range(args.calls):
        s.run(None, feed)
      best[name] = min(best[name], (time.perf_counter() - start) / args.calls)
  load = "%.2f %.2f %.2f" % os.getloadavg()
  for name, seconds in best.items():
    print(f"{name:9s} {seconds * 1e6:8.1f} us a call  (load {load})")
  for step in (4.0, 6.0):  # summed dt*|A| over L steps: L * step
    steep = {"dtA": np.full(shape, -step, np.float32), "dBu": feed["dBu"]}
    h = {name: s.run(None, steep)[0] for name, s in sessions.items()}
    print(
        f"dt*|A| = {step} a step (sum {step * length:.0f}): finite unrolled "
        f"{np.isfinite(h['unrolled']).all()}, cumsum {np.isfinite(h['cumsum']).all()}"
    )


if __name__ == "__main__":
  main()
