"""coatnet-scale: distributed pretraining of CoAtNet-0..7.

Importing the package registers the CoAtNet variants with timm and does nothing else: no argv
parsing, no process groups, no environment reads.
"""

from coatnet_scale import models  # noqa: F401  (registers coatnet0..7 with timm)

__version__ = "0.1.0"
