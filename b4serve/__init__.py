"""Serve EfficientNet-B4 with TorchServe: .npy images in, flip-TTA class probabilities out.

- ``b4serve.serving``: the worker's code, the only part the model archive carries.
- ``b4serve.ops``: what an operator runs beside the server (export, deploy, keys, client, health).
- ``b4serve.lab``: benchmarks, soak, the demo-model builder and throwaway test servers.
"""
