"""diffedit: diffusion-based image inversion and editing."""

import os

# transformers warns at import about optional vision backends we never use; keep stderr for our
# own progress and errors.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
