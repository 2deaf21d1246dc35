"""qexp: quantization-aware-training experiments on one trainer."""
