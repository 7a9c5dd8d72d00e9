"""llm-offload: a GPT-style decoder trained with FedAvg, bf16 weights through offload."""
