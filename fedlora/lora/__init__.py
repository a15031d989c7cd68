"""The LoRA algebra: low-rank factors, adapters, client updates, the versioned base, the global model, the exactness probes and the server optimizers."""
