"""Serve EfficientNet-B4 with TorchServe: decode, validate, preprocess, TTA, client."""
