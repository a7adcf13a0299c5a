"""hm-export: export memory-augmented small language models to device bundles."""

__version__ = "0.1.0"
