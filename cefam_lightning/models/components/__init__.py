"""Plain ``nn.Module`` building blocks: the shapes-world CNN, the CE-FAM translator, the concept scorer."""

from cefam_lightning.models.components.concept_scorer import ConceptScorer
from cefam_lightning.models.components.shapes_cnn import ShapesCNN
from cefam_lightning.models.components.translator import Translator, default_hidden_dims

__all__ = ["ConceptScorer", "ShapesCNN", "Translator", "default_hidden_dims"]

from cefam_lightning.models.components.siam_head import AttributeMaps, SIAMHead, attribute_presence, zero_border

__all__ += ["AttributeMaps", "SIAMHead", "attribute_presence", "zero_border"]
