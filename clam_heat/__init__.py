"""clam-heat: resumable, CLAM-compatible attention heatmaps for MIL models on whole-slide images."""

__version__ = "0.1.0"
