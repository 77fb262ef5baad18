"""Media file -> text, audio and visual features on one time grid (see docs/FEATURES.md).

Importing this package is cheap: models and heavy libraries load on first use or in
:meth:`Extractor.warmup`.
"""

from preprocessing.bundle import FeatureBundle, MediaSummary
from preprocessing.extractor import Extractor
from preprocessing.profiles import MODALITIES, PROFILES, FeatureProfile, get_profile
from preprocessing.settings import ExtractorSettings

__all__ = [
    "MODALITIES",
    "PROFILES",
    "Extractor",
    "ExtractorSettings",
    "FeatureBundle",
    "FeatureProfile",
    "MediaSummary",
    "get_profile",
]
