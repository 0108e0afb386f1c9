"""diffedit: diffusion-based image inversion and editing."""

__version__ = "0.1.0"
