"""clam-heat: resumable, CLAM-compatible attention heatmaps for MIL models on whole-slide images."""

__version__ = "0.1.0"

import logging as _logging

# Library logging stays silent unless the application (our CLI, or the user) configures it.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
