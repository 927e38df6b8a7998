"""The BiLSTM student as ONNX, built directly around one bidirectional ``LSTM`` op with ``sequence_lens``.

Why not torch.onnx.export: the model's two one-way LSTMs (the backward one over each row reversed within its
length, see models.BiLSTM) export as two sequential LSTM ops plus gathers, transposes and per-call weight
re-layouts. ONNX's own LSTM already has that semantics: with ``sequence_lens`` the forward direction's final
state is taken at each row's last word, and the reverse direction reads each row from its last word back to the
first. One op runs both directions (onnxruntime splits them over two threads) and the graph has 10 nodes;
measured here on review text at 2 threads, model only, it ran ~1.3x the exported graph's texts/s.
tests/tasks/students checks that its logits equal the PyTorch model's.
"""

from __future__ import annotations

import numpy as np

IR_VERSION = 10  # onnxruntime 1.2x-1.3x reads IR <= 13; onnx's newest writer default may be beyond that


def _gates(w: np.ndarray) -> np.ndarray:
    # PyTorch stacks the gates as (input, forget, cell, output); ONNX as (input, output, forget, cell).
    i, f, g, o = np.split(w, 4, axis=0)
    return np.concatenate([i, o, f, g], axis=0)


def bilstm_onnx(model, opset: int = 18):
    """ONNX ModelProto of a trained models.BiLSTM in eval mode: inputs ids [B, T] int64, lengths [B] int64;
    output logits [B, C]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def arr(t) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    hidden = model.fwd.hidden_size
    w = np.stack([_gates(arr(m.weight_ih_l0)) for m in (model.fwd, model.bwd)])  # [2, 4H, E]
    r = np.stack([_gates(arr(m.weight_hh_l0)) for m in (model.fwd, model.bwd)])  # [2, 4H, H]
    b = np.stack([np.concatenate([_gates(arr(m.bias_ih_l0)), _gates(arr(m.bias_hh_l0))])
                  for m in (model.fwd, model.bwd)])  # [2, 8H]
    inits = {"embed": arr(model.embed.weight), "W": w, "R": r, "B": b,
             "fc_w": arr(model.fc.weight), "fc_b": arr(model.fc.bias),
             "out_w": arr(model.out.weight), "out_b": arr(model.out.bias),
             "one": np.array([1], dtype=np.int64), "flat": np.array([0, 2 * hidden], dtype=np.int64)}
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["x"]),  # [B, T, E]
        helper.make_node("Transpose", ["x"], ["x_tbe"], perm=[1, 0, 2]),  # the LSTM op reads [T, B, E]
        # An empty row reads its one [PAD], as the PyTorch model does (lengths clamped to >= 1).
        helper.make_node("Max", ["lengths", "one"], ["n"]),
        helper.make_node("Cast", ["n"], ["seq_lens"], to=TensorProto.INT32),
        helper.make_node("LSTM", ["x_tbe", "W", "R", "B", "seq_lens"], ["", "h_last"], direction="bidirectional",
                         hidden_size=hidden),  # h_last [2, B, H]: forward at n-1, reverse after word 0
        helper.make_node("Transpose", ["h_last"], ["h_b2h"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["h_b2h", "flat"], ["h"]),  # [B, 2H]: forward then backward, as torch.cat
        helper.make_node("Gemm", ["h", "fc_w", "fc_b"], ["fc"], transB=1),
        helper.make_node("Tanh", ["fc"], ["act"]),
        helper.make_node("Gemm", ["act", "out_w", "out_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "slimflow-bilstm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "time"]),
         helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", int(model.out.out_features)])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION,
                              producer_name="slimflow")
    onnx.checker.check_model(proto)
    return proto
