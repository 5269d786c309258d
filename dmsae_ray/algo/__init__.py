"""The algorithm in plain PyTorch: the Matryoshka BatchTopK SAE and its kernels, the
training step and loop, gradient x activation attribution, core selection and
evaluation. Imports only ``dmsae_ray.config``, ``dmsae_ray.jsonio`` and
``dmsae_ray.model``; never Ray."""
