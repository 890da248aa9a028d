"""Lightning callbacks of cefam-lightning, one per file."""

from callbacks.cache_pooled_features import CachePooledFeatures
from callbacks.concept_score_figures import ConceptScoreFigures

__all__ = ["CachePooledFeatures", "ConceptScoreFigures"]
