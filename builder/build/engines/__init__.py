"""Engine builders, one module per target (OpenVINO on CPU, TensorRT-LLM on GPU)."""
