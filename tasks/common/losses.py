"""Losses by name, and weighted loss ensembles whose parts are config.

A loss is a registered function whose arguments name what it needs from a training step's outputs
(``logits``, ``target``, ``teacher_logits``, ``load_balance``, ...) plus keyword options. A
:class:`LossEnsemble` is a weighted sum of such terms; calling it with the step's outputs returns
``{"loss": total, "loss/<term>": value, ...}`` (term values unweighted, so runs with different weights
stay comparable), and each term belongs to a *group* (``task`` or ``distill``) so that optimizers
that treat the two gradients differently (DOT) can back-propagate each group's total on its own.

Not a published method: the mechanism DESIGN.md describes, shared by the distillation and sweep jobs.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tasks.common.registry import lookup, register_loss

GROUPS = ("task", "distill")


def single_score(fn: Callable) -> Callable:
    """Mark a binary loss that reads one score per example (``logits`` of shape [N] or [N, 1]) and
    targets in {0, 1}: a job gives the model a single output when every term is such a loss."""
    fn.single_score = True
    return fn


@register_loss("cross_entropy")
def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


@dataclass(frozen=True)
class Term:
    """One weighted term: registry ``name``, ``weight``, ``group`` and the loss's keyword options."""

    name: str
    weight: float = 1.0
    group: str = "task"
    options: Mapping[str, Any] = field(default_factory=dict)


def _inputs_and_options(fn: Callable) -> tuple[list[str], set[str]]:
    """A loss's required parameters are step outputs; parameters with defaults are options."""
    params = inspect.signature(fn).parameters.values()
    return ([p.name for p in params if p.default is inspect.Parameter.empty],
            {p.name for p in params if p.default is not inspect.Parameter.empty})


class LossEnsemble:
    """``sum_i weight_i * loss_i(outputs)`` over named terms, with every part reported."""

    def __init__(self, terms: Mapping[str, Term]):
        if not terms:
            raise ValueError("a loss ensemble needs at least one term")
        self.terms = dict(terms)
        self._fns: dict[str, Callable] = {}
        for key, term in self.terms.items():
            if term.group not in GROUPS:
                raise ValueError(f"loss term {key!r}: group must be one of {GROUPS}, got {term.group!r}")
            fn = lookup("loss", term.name)
            _, options = _inputs_and_options(fn)
            unknown = set(term.options) - options
            if unknown:
                raise ValueError(f"loss term {key!r} ({term.name}) has no option(s) {sorted(unknown)}; "
                                 f"it takes {sorted(options) or 'none'}")
            self._fns[key] = fn

    @classmethod
    def from_config(cls, spec: Mapping[str, Mapping[str, Any]]) -> "LossEnsemble":
        """``{term: {"name": ..., "weight": ..., "group": ..., <option>: ...}}`` as written in YAML."""
        terms = {}
        for key, entry in spec.items():
            entry = dict(entry)
            name = entry.pop("name", key)
            terms[key] = Term(name, float(entry.pop("weight", 1.0)), entry.pop("group", "task"), entry)
        return cls(terms)

    def needs(self) -> set[str]:
        """The step outputs the terms read (a job computes teacher outputs only when asked for)."""
        return {n for fn in self._fns.values() for n in _inputs_and_options(fn)[0]}

    def __call__(self, outputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        for key, term in self.terms.items():
            fn = self._fns[key]
            required, _ = _inputs_and_options(fn)
            missing = [n for n in required if n not in outputs]
            if missing:
                raise KeyError(f"loss term {key!r} ({term.name}) needs step output(s) {missing}; "
                               f"this step produced {sorted(outputs)}")
            parts[f"loss/{key}"] = fn(**{n: outputs[n] for n in required}, **term.options)
        parts["loss"] = self.total(parts)
        return parts

    def total(self, parts: Mapping[str, torch.Tensor], group: str | None = None) -> torch.Tensor:
        """Weighted sum of the terms (of one group, if given) from a call's ``parts``."""
        chosen = [(t.weight, parts[f"loss/{k}"]) for k, t in self.terms.items()
                  if group is None or t.group == group]
        if not chosen:
            raise ValueError(f"the loss ensemble has no {group!r} term")
        return sum(w * v for w, v in chosen)

    def single_score(self) -> bool:
        """True when every term reads one score per example (binary margin losses), False when every
        term reads one logit per class; a mix cannot train one model."""
        kinds = {getattr(self._fns[k], "single_score", False) for k in self.terms}
        if len(kinds) > 1:
            raise ValueError("the loss ensemble mixes single-score binary losses with per-class losses: "
                             f"{sorted(self.terms)}")
        return kinds.pop()

    def groups(self) -> set[str]:
        return {t.group for t in self.terms.values()}
