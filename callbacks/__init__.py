"""Lightning callbacks of cefam-lightning, one per file."""

from callbacks.concept_score_figures import ConceptScoreFigures

__all__ = ["ConceptScoreFigures"]
