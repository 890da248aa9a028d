"""The rules a config value must follow, and the error a broken one raises: shared by the run's config schema
(:mod:`cefam_lightning.training.config`) and by each method's own section (its registration's ``rules``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cefam_lightning.errors import CefamError


class ConfigError(CefamError):
    """A configuration file or override is invalid; the message names the key and where it came from."""


@dataclass(frozen=True)
class Rule:
    """What the values of some config keys must be.

    Attributes:
        keys: the dotted keys the rule applies to.
        test: whether a value is allowed.
        expect: what ``test`` asks for, as the error says it: ``<key> must be <expect>, got <value>``.
        optional: ``null`` is allowed too.
        each: the value is a list, and each of its elements must pass ``test``.
    """

    keys: tuple[str, ...]
    test: Callable[[Any], bool]
    expect: str
    optional: bool = False
    each: bool = False


def _number(v: Any) -> bool:
    """A finite int or float (not a bool: YAML's ``true`` is no count)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def at_least(low: float, *keys: str, optional: bool = False, each: bool = False) -> Rule:
    """``keys`` hold finite numbers ``>= low`` (``null`` too if ``optional``; every element if ``each``)."""
    return Rule(keys, lambda v: _number(v) and v >= low, f">= {low}", optional, each)


def above(low: float, *keys: str) -> Rule:
    """``keys`` hold finite numbers ``> low``."""
    return Rule(keys, lambda v: _number(v) and v > low, f"> {low}")


def between(low: float, high: float, *keys: str, low_open: bool = False, high_open: bool = False) -> Rule:
    """``keys`` hold numbers in the interval from ``low`` to ``high``, each end closed unless said open."""

    def test(v: Any) -> bool:
        return _number(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)

    return Rule(keys, test, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def one_of(choices: Collection[str], *keys: str, ignore_case: bool = False) -> Rule:
    """A fixed set of strings, the code's own list; ``ignore_case`` where the code lower-cases the value."""
    allowed = tuple(choices)
    folded = {c.lower() for c in allowed}
    return Rule(
        keys,
        lambda v: isinstance(v, str) and (v.lower() in folded if ignore_case else v in allowed),
        f"one of {allowed}",
    )


@dataclass(frozen=True)
class CrossRule:
    """A constraint between keys: ``test(cfg)`` must hold, else ``message(cfg)`` is the error."""

    test: Callable[[DictConfig], bool]
    message: Callable[[DictConfig], str]


def _show(v: Any) -> str:
    """A value as the error shows it: strings quoted, numbers and lists as they are."""
    return repr(v) if isinstance(v, str) else str(v)


def rule_errors(cfg: DictConfig, rules: Sequence[Rule], cross_rules: Sequence[CrossRule] = ()) -> list[str]:
    """Every value of ``cfg`` that breaks one of ``rules`` (then of ``cross_rules``), as messages that name the key
    and the value."""
    errors = []
    for rule in rules:
        for key in rule.keys:
            value = OmegaConf.select(cfg, key)
            if value is None and rule.optional:
                continue
            items = list(enumerate(value)) if rule.each else [(None, value)]
            for i, v in items:
                if not rule.test(v):
                    where = key if i is None else f"{key}[{i}]"
                    finite = "a finite number " if isinstance(v, float) and not math.isfinite(v) else ""
                    errors.append(f"{where} must be {finite}{rule.expect}, got {_show(v)}")
    if not errors:  # the cross rules compare values that passed their own rules
        errors = [r.message(cfg) for r in cross_rules if not r.test(cfg)]
    return errors
