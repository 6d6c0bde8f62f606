"""Layer-wise relevance propagation and Deep Taylor decomposition, on any architecture whose
operations have rules (:mod:`saliencycheck.lrp_rules`: every convolution and linear layer *call*,
residual additions and concatenations, pooling, batch norms merged for the rule).

* ``lrp`` with one ``rule`` for every layer (``epsilon``, ``gamma``, ``alpha_beta``, ``zplus``),
  or a ``composite``: the standard assignments of Montavon et al. 2019 and Kohlbrenner et al.
  2020, as zennit names them: ``epsilon_plus`` (z⁺ on convolutions, ε on dense layers),
  ``epsilon_gamma_box`` (the box rule zᴮ on the first layer with the input's normalised pixel
  bounds, γ on convolutions, ε on dense layers), ``epsilon_alpha2_beta1`` (α=2, β=1 on
  convolutions, ε on dense layers).
* ``deep_taylor`` (Montavon et al. 2017): z⁺ on every hidden layer, zᴮ on the first.

The relevance of the explained logit starts as its value, so the map sums to the logit where
the rules conserve it (LRP-ε with ε → 0 on a network without biases). Shape (N, C, H, W).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from saliencycheck.engine.passes import (
    LrpFamily,
    MethodPlan,
    Request,
    RowMaps,
    RowSource,
    planned_method,
)
from saliencycheck.lrp_rules import STABILIZER, LrpRule, LrpRules
from saliencycheck.methods.base import AttributionContext
from saliencycheck.methods.registry import MethodParams

SingleRule = Literal["epsilon", "gamma", "alpha_beta", "zplus"]
Composite = Literal["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]
_USES = {"epsilon": {"epsilon"}, "gamma": {"gamma"}, "alpha_beta": {"alpha", "beta"},
         "zplus": set(), "epsilon_plus": {"epsilon"}, "epsilon_gamma_box": {"epsilon", "gamma"},
         "epsilon_alpha2_beta1": {"epsilon"}}


class LrpParams(MethodParams):
    """Parameters of ``lrp``: one rule everywhere, or a composite."""

    rule: SingleRule | None = Field(
        None, description="one rule for every convolution and linear layer: epsilon, gamma, "
        "alpha_beta or zplus (default epsilon, unless a composite is given)")
    composite: Composite | None = Field(
        None, description="rules by layer kind instead: epsilon_plus, epsilon_gamma_box "
        "(box rule on the first layer, from images.mean/std), epsilon_alpha2_beta1")
    epsilon: float = Field(1e-6, gt=0, description="ε of the epsilon rule (on dense layers in "
                           "the composites)")
    gamma: float = Field(0.25, ge=0, description="γ of the gamma rule")
    alpha: float = Field(1.0, ge=0, description="α of alpha_beta (α − β = 1)")
    beta: float = Field(0.0, ge=0, description="β of alpha_beta")

    @model_validator(mode="after")
    def _one_choice(self) -> LrpParams:
        if self.rule is not None and self.composite is not None:
            raise ValueError("give rule or composite, not both")
        unused = sorted(self.model_fields_set & {"epsilon", "gamma", "alpha", "beta"}
                        - _USES[self.choice])
        if unused:
            raise ValueError(f"{', '.join(unused)} not used by {self.choice}")
        if abs(self.alpha - self.beta - 1) > 1e-9:
            raise ValueError(f"alpha − beta must be 1 (relevance is conserved), got "
                             f"{self.alpha:g} − {self.beta:g}")
        return self

    @property
    def choice(self) -> str:
        return self.composite or self.rule or "epsilon"

    def default_label(self, name: str) -> str:
        return f"{name}_{self.choice}"


def box_bounds(context: AttributionContext, channels: int) -> tuple[tuple[float, ...], ...]:
    """The lowest and highest normalised pixel values per channel (pixels in [0, 1])."""
    mean = context.mean * channels if len(context.mean) == 1 else context.mean
    std = context.std * channels if len(context.std) == 1 else context.std
    return (tuple(-m / s for m, s in zip(mean, std)),
            tuple((1 - m) / s for m, s in zip(mean, std)))


def lrp_rules(choice: str, context: AttributionContext, channels: int, *, epsilon: float,
              gamma: float, alpha: float, beta: float) -> LrpRules:
    """The rule each layer kind gets under a rule or composite ``choice``."""
    dense = LrpRule("epsilon", epsilon=epsilon)
    if choice == "epsilon_plus":
        return LrpRules(conv=LrpRule("zplus"), dense=dense)
    if choice == "epsilon_gamma_box":
        low, high = box_bounds(context, channels)
        return LrpRules(conv=LrpRule("gamma", gamma=gamma), dense=dense,
                        first=LrpRule("box", low=low, high=high))
    if choice == "epsilon_alpha2_beta1":
        return LrpRules(conv=LrpRule("alpha_beta", alpha=2.0, beta=1.0), dense=dense)
    single = LrpRule(choice, epsilon=epsilon if choice == "epsilon" else STABILIZER,
                     gamma=gamma, alpha=alpha, beta=beta)
    return LrpRules(conv=single, dense=single)


def _relevance_maps(source: RowSource, rules: LrpRules, name: str) -> MethodPlan:
    """One modified backward per row; the map is the relevance at the input: ``x ⊙ g``, or
    the first layer's own output where it hands back relevance (the box rule)."""
    at_input = rules.relevance_at_input
    maps = RowMaps(fn=lambda inputs, grads, pair: grads if at_input else inputs * grads,
                   count=source.count)
    return MethodPlan([Request(LrpFamily(rules), source, maps, name)], maps.result)


def _channels(source: RowSource) -> int:
    return source.build(torch.arange(1))[0].shape[1]


def conserving_reference(inputs: torch.Tensor, context: AttributionContext, *,
                         rule: str | None, composite: str | None, **_: object
                         ) -> torch.Tensor | None:
    """LRP-ε (LRP-z as ε → 0) conserves relevance: on a network without biases the map sums
    to the logit, f(x) − f(0); the completeness test measures how far biases (which absorb
    relevance) take it. Other rules and the composites do not conserve it: None."""
    return torch.zeros_like(inputs) if composite is None and rule in (None, "epsilon") else None


@planned_method("lrp", params=LrpParams, reference=conserving_reference,
                description="layer-wise relevance propagation: a rule or composite of rules")
def lrp(model: nn.Module, source: RowSource, context: AttributionContext, *,
        rule: str | None = None, composite: str | None = None, epsilon: float = 1e-6,
        gamma: float = 0.25, alpha: float = 1.0, beta: float = 0.0) -> MethodPlan:
    """LRP with ``rule`` everywhere or a ``composite`` (see the module docstring)."""
    rules = lrp_rules(composite or rule or "epsilon", context, _channels(source),
                      epsilon=epsilon, gamma=gamma, alpha=alpha, beta=beta)
    return _relevance_maps(source, rules, "lrp")


@planned_method("deep_taylor",
                description="deep Taylor decomposition: z⁺ on hidden layers, box rule on the "
                "first")
def deep_taylor(model: nn.Module, source: RowSource, context: AttributionContext) -> MethodPlan:
    """Deep Taylor decomposition (Montavon et al. 2017) for ReLU networks: relevance
    propagated with z⁺ through every hidden layer and zᴮ (the input's pixel bounds) at the
    first."""
    low, high = box_bounds(context, _channels(source))
    rules = LrpRules(conv=LrpRule("zplus"), dense=LrpRule("zplus"),
                     first=LrpRule("box", low=low, high=high))
    return _relevance_maps(source, rules, "deep_taylor")

