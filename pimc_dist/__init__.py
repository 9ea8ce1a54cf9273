"""pimc_dist: distributed pixel-wise multimodal contrastive pretraining on satellite data."""

__version__ = "0.1.0"
