"""The worker's code, and the only code the model archive carries: bytes -> array -> tensor ->
model -> probabilities -> JSON. It imports neither TorchServe nor ``b4serve.ops`` or
``b4serve.lab`` (tests/serving/test_boundary.py keeps it so)."""
