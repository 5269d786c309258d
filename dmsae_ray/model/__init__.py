"""The language model and its tokens: loading (hub, local, GGUF, the embedded
default), the hooked layer, token blocks of a corpus. Imports only
``dmsae_ray.config``; never Ray."""
