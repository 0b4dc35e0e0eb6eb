"""Llama-family model code, checkpoint loaders (GGUF and Hugging Face) and tokenizers."""
