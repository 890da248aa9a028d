"""SIAM's trainable parts as plain ``nn.Module`` s (docs/method.md#siam; Marcos, Lobry, Tuia, ICCV-W 2019).

- :class:`AttributeMaps`: a 1x1 conv from the backbone's activation map to one non-negative map per attribute
  (ReLU), with an optional zeroed border; an attribute's presence is the global average of its map
  (:func:`attribute_presence`, optionally squashed by tanh as the authors do).
- :class:`SIAMHead`: pools each attribute map to a fixed grid, matches it with ``n_templates`` non-negative
  spatial templates (a grouped conv whose kernel is the whole grid, so each template is a weighting of
  locations), ReLU, combines the template responses with per-attribute weights into one *attribute score*, and
  maps the scores to the output with a linear layer.

Because the maps and the templates are non-negative and the template conv has no bias, the ReLU after it is
the identity (kept for the authors' form), and an attribute's score is linear in its pooled map:
``s_a = <P(m_a), T_a>`` with the *effective template* ``T_a = sum_j v_aj T_aj`` (signed: the authors start the
two templates at weights ``+0.5`` and ``-0.5``, one for where an attribute supports the output and one for where
it counts against it). This is what makes SIAM's explanation exact (see :meth:`SIAMHead.contribution_maps`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttributeMaps(nn.Module):
    """``Conv2d(in_channels -> n_attr, 1x1)`` + ReLU, with a ``border`` of zeros (authors: 2 pixels).

    Args:
        in_channels: channels of the backbone's activation map.
        n_attr: number of attributes.
        border: width in map pixels of the frame set to 0 (0: none). A border that would leave no pixel of a
            map is an error at forward time.
    """

    def __init__(self, in_channels: int, n_attr: int, border: int = 0):
        super().__init__()
        if in_channels <= 0 or n_attr <= 0:
            raise ValueError(f"in_channels and n_attr must be positive, got {in_channels} and {n_attr}")
        if border < 0:
            raise ValueError(f"border must be >= 0, got {border}")
        self.in_channels, self.n_attr, self.border = in_channels, n_attr, border
        self.conv = nn.Conv2d(in_channels, n_attr, 1)

    def forward(self, features: Tensor) -> Tensor:
        """``features`` ``(B, C, h, w)`` -> attribute maps ``(B, n_attr, h, w)``, non-negative, border zeroed."""
        maps = F.relu(self.conv(features))
        return zero_border(maps, self.border)


def zero_border(maps: Tensor, border: int) -> Tensor:
    """``maps`` ``(..., h, w)`` with a frame ``border`` pixels wide set to 0 (out of place)."""
    if border == 0:
        return maps
    h, w = maps.shape[-2:]
    if 2 * border >= min(h, w):
        raise ValueError(f"border={border} leaves nothing of a {h}x{w} attribute map; use a border < {min(h, w) / 2}")
    inner = maps[..., border : h - border, border : w - border]
    return F.pad(inner, (border, border, border, border))


def attribute_presence(maps: Tensor, tanh: bool = True) -> Tensor:
    """Attribute presence in ``[0, 1]``: the global average of each map, ``(B, n_attr, h, w)`` -> ``(B, n_attr)``.

    Args:
        maps: non-negative attribute maps.
        tanh: squash the average with tanh (the authors'); else clamp it to ``[0, 1]``.
    """
    pooled = maps.mean(dim=(-2, -1))
    return torch.tanh(pooled) if tanh else pooled.clamp(max=1.0)


class SIAMHead(nn.Module):
    """Attribute maps -> attribute scores (spatial templates) -> output (linear layer).

    Args:
        n_attr: number of attributes (input maps).
        n_out: outputs (classes, or regression targets).
        grid: ``(gh, gw)`` or one int: the maps are average-pooled (adaptively) to this grid before the
            templates are applied (authors: 15).
        n_templates: templates per attribute (authors: 2).
        template_init: initial value of every template weight (authors: 0.01). It must be > 0: the maps and
            templates are non-negative, so all-zero templates give a response of exactly 0, where the ReLU passes
            no gradient and the templates would never move.
    """

    def __init__(
        self,
        n_attr: int,
        n_out: int,
        grid: int | Sequence[int] = 15,
        n_templates: int = 2,
        template_init: float = 0.01,
    ):
        super().__init__()
        gh, gw = (grid, grid) if isinstance(grid, int) else tuple(int(g) for g in grid)
        if min(gh, gw, n_attr, n_out, n_templates) <= 0:
            raise ValueError(
                f"grid, n_attr, n_out and n_templates must be positive, got grid={grid}, n_attr={n_attr}, "
                f"n_out={n_out}, n_templates={n_templates}"
            )
        if template_init <= 0:
            raise ValueError(f"template_init must be > 0 (zero templates get no gradient), got {template_init}")
        self.n_attr, self.n_out, self.grid, self.n_templates = n_attr, n_out, (gh, gw), n_templates
        self.pool = nn.AdaptiveAvgPool2d((gh, gw))
        self.templates = nn.Conv2d(n_attr, n_attr * n_templates, (gh, gw), groups=n_attr, bias=False)
        nn.init.constant_(self.templates.weight, template_init)
        # Per attribute, one weight per template: the authors' grouped 1x1 conv, as an (n_attr, n_templates) matrix.
        self.combine = nn.Parameter(torch.empty(n_attr, n_templates))
        with torch.no_grad():  # the authors': the first template adds (+0.5), the second subtracts (-0.5)
            self.combine[:, 0] = 0.5
            if n_templates > 1:
                self.combine[:, 1:] = -0.5 / (n_templates - 1)
        self.linear = nn.Linear(n_attr, n_out)

    def template_weights(self) -> Tensor:
        """``(n_attr, n_templates, gh, gw)``: every attribute's templates."""
        return self.templates.weight.view(self.n_attr, self.n_templates, *self.grid)

    def template_responses(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """(pooled maps ``(B, n_attr, gh, gw)``, template responses after ReLU ``(B, n_attr, n_templates)``)."""
        pooled = self.pool(maps)
        responses = F.relu(self.templates(pooled)).view(maps.shape[0], self.n_attr, self.n_templates)
        return pooled, responses

    def scores(self, maps: Tensor) -> Tensor:
        """Attribute scores ``(B, n_attr)``: template responses combined by the per-attribute weights."""
        _, responses = self.template_responses(maps)
        return (responses * self.combine).sum(-1)

    def forward(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """``maps`` ``(B, n_attr, h, w)`` -> (output ``(B, n_out)``, attribute scores ``(B, n_attr)``)."""
        scores = self.scores(maps)
        return self.linear(scores), scores

    def contribution_maps(self, maps: Tensor, weights: Tensor) -> Tensor:
        """Where each attribute's contribution comes from, on the grid: ``(B, n_attr, gh, gw)``.

        ``weights`` ``(B, n_attr)`` are the final layer's weights of the explained output for each image. The map
        of attribute ``a`` is ``w_a * P(m_a) * sum_j v_aj 1[r_aj > 0] T_aj``: the pooled attribute map times its
        effective template (the templates whose ReLU is active, weighted by ``combine``), so it sums over the grid
        exactly to the contribution ``w_a * s_a``.
        """
        pooled, responses = self.template_responses(maps)
        active = (responses > 0).to(maps.dtype)  # (B, n_attr, n_templates)
        effective = torch.einsum("bat,at,athw->bahw", active, self.combine, self.template_weights())
        return weights[:, :, None, None] * pooled * effective

    def template_l1(self) -> Tensor:
        """The L1 penalty on the templates: the mean absolute template weight (the authors')."""
        return self.templates.weight.abs().mean()

    @torch.no_grad()
    def clamp_templates_(self) -> None:
        """Project the templates back to ``>= 0`` (call after every optimizer step)."""
        self.templates.weight.clamp_(min=0.0)
