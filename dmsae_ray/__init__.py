"""dmsae-ray: Distilled Matryoshka Sparse Autoencoders on Ray."""

__version__ = "0.1.0"
