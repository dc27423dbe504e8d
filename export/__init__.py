"""normport export: lowering normalization layers to standard ONNX ops (see issue 3)."""
