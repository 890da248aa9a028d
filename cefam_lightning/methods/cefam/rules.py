"""The rules a CE-FAM explanation follows, in one place (docs/method.md#explanation-rules).

Seven settings decide what ``explain``, ``evaluate``, the training callbacks and a run's test-time evaluation compute:

- ``k``: channels deleted (``paper`` relevance) and masked (contributions) at most;
- ``fill``: what a masked channel map becomes in a contribution (``spatial_mean`` | ``zero``);
- ``select_layers``: the layers a concept's layer is chosen from (``auto`` | ``all`` | layer names);
- ``gradient``: which derivative gives a layer's channel weights (``direct`` | ``full``);
- ``region_weights``: which channel weights draw a region (``signed`` | ``positive``);
- ``relevance``: how a concept's layer is chosen (``paper`` | ``map``);
- ``contribution_layer``: where a concept's contribution is measured (``selected`` | ``last`` | ``image`` | a layer
  name).

A run records its ``cefam:`` section's values in the checkpoint; ``explain`` and ``evaluate`` use those unless told
otherwise, by single options or by a preset (``--preset paper``: the CE-FAM authors' rules in one switch). Every
result says which rules made it (:func:`describe_rules`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cefam_lightning.methods.cefam.contributions import FILLS
from cefam_lightning.methods.cefam.regions import GRADIENTS, REGION_WEIGHTS
from cefam_lightning.methods.cefam.relevance import RELEVANCES, SELECT_MODES

RULE_KEYS = ("k", "fill", "select_layers", "gradient", "region_weights", "relevance", "contribution_layer")
CONTRIBUTION_LAYERS = ("selected", "last", "image")  # or a layer name
PER_CONCEPT_CONTRIBUTIONS = ("selected", "image")  # the rules that measure each concept by its selected layer

# The rules of a checkpoint that recorded none (written before a rule existed): what the code computed then.
LEGACY_RULES: dict[str, Any] = {
    "k": 20,
    "fill": "spatial_mean",
    "select_layers": "auto",
    "gradient": "direct",
    "region_weights": "signed",
    "relevance": "paper",
    "contribution_layer": "selected",
}

PRESETS: dict[str, dict[str, Any]] = {
    # The CE-FAM authors' rules, as their released code computes them: the total derivative, signed weights, the
    # deletion-curve relevance over all four layers, each contribution at the concept's own layer with the
    # spatial-mean fill (the whole tensor's mean at a layer read only through global pooling).
    "paper": {
        "k": 20,
        "fill": "spatial_mean",
        "select_layers": "all",
        "gradient": "full",
        "region_weights": "signed",
        "relevance": "paper",
        "contribution_layer": "selected",
    },
}


def check_rules(rules: Mapping[str, Any], layers: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming the first rule whose value is not allowed (layer names against ``layers`` when
    given)."""
    for key, allowed in (
        ("fill", FILLS),
        ("gradient", GRADIENTS),
        ("region_weights", REGION_WEIGHTS),
        ("relevance", RELEVANCES),
    ):
        if key in rules and rules[key] not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {rules[key]!r}")
    if "k" in rules and (not isinstance(rules["k"], int) or isinstance(rules["k"], bool) or rules["k"] < 1):
        raise ValueError(f"k must be an integer >= 1, got {rules['k']!r}")
    select = rules.get("select_layers")
    if isinstance(select, str) and select not in SELECT_MODES:
        raise ValueError(f"select_layers must be 'auto', 'all' or a list of layer names, got {select!r}")
    where = rules.get("contribution_layer")
    if where is not None and where not in CONTRIBUTION_LAYERS:
        if not isinstance(where, str) or (layers is not None and where not in layers):
            names = f" or one of {list(layers)}" if layers is not None else " or a layer name"
            raise ValueError(f"contribution_layer must be 'selected', 'last', 'image'{names}, got {where!r}")


def resolve_rules(
    defaults: Mapping[str, Any],
    given: Mapping[str, Any] | None = None,
    preset: str | None = None,
    layers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The rules in effect: ``defaults`` (a checkpoint's), then the ``preset``'s, then the ``given`` ones that are
    not ``None``; checked (:func:`check_rules`).

    Raises:
        ValueError: an unknown preset or rule, or a value that is not allowed, naming it.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = sorted(set(given) - set(RULE_KEYS))
    if unknown:
        raise ValueError(f"unknown explanation rule {unknown[0]!r} (rules: {', '.join(RULE_KEYS)})")
    rules = {**LEGACY_RULES, **{k: v for k, v in defaults.items() if k in RULE_KEYS}}
    rules.update(PRESETS.get(preset, {}))
    rules.update(given)
    check_rules(rules, layers)
    return rules


def rule_settings(settings: Any) -> dict[str, Any]:
    """The rules an ``ExplainSettings`` / ``EvaluationSettings`` gives (``None``: not given)."""
    return {key: getattr(settings, key) for key in RULE_KEYS}


def describe_rules(rules: Mapping[str, Any]) -> str:
    """One line saying which rules a result used, e.g. for a table's caption."""
    select = rules["select_layers"]
    select = select if isinstance(select, str) else ",".join(select)
    return (
        f"gradient={rules['gradient']}, region weights={rules['region_weights']}, relevance={rules['relevance']} "
        f"(layers: {select}), contribution layer={rules['contribution_layer']}, K={rules['k']}, fill={rules['fill']}"
    )
