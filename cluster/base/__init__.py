"""The shared base: configs, page hashing, tokenizer, sampling parameters, wire conversion, event bus, metrics
endpoint and model store. Router and worker import it; it imports neither, nor the control plane."""
