"""normport runtime: onnxruntime sessions, serving and verification."""
