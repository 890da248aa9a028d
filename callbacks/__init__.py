"""Lightning callbacks of cefam-lightning, one per file."""

from callbacks.cache_pooled_features import CachePooledFeatures
from callbacks.concept_region_maps import ConceptRegionMaps
from callbacks.concept_score_figures import ConceptScoreFigures
from callbacks.contribution_logger import ContributionLogger
from callbacks.region_metrics import RegionMetricsCallback
from callbacks.stop_on_non_finite import NonFiniteLossError, StopOnNonFiniteLoss

__all__ = [
    "CachePooledFeatures",
    "ConceptScoreFigures",
    "ConceptRegionMaps",
    "ContributionLogger",
    "RegionMetricsCallback",
    "NonFiniteLossError",
    "StopOnNonFiniteLoss",
]
