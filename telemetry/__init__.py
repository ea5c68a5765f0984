"""Where every process's metrics go (JSONL, TensorBoard, Prometheus, Weights & Biases): shared by all roles."""
