"""Fake-quant perplexity harness over Hugging Face transformers."""
