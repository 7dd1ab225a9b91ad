"""napari-diffrecon: medical image reconstruction with unsupervised diffusion-model priors."""

__version__ = "0.1.0"
