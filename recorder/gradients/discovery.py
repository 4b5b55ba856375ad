"""Which parameters get per-example gradients, and through which hooked calls.

A module's rule may expand into several layers (an LSTM: one per layer and direction;
MultiheadAttention: its in-projection, out_proj and bias_k/v), and a parameter shared by
several modules (tied input/output embeddings) becomes one layer fed by every user, so it
is counted once and its cross terms are included. Only real, trainable nn.Parameters are
covered: computed tensors (parametrize / weight_norm) never are.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch.nn as nn
from torch.nn.utils import parametrize

from . import rules_sequence  # noqa: F401  (registers the attention / recurrent rules)
from .rules import Rule, TiedRule, find_rule

COMPUTED = ("computed by a parametrization (torch.nn.utils.parametrize / weight_norm): "
            "its per-example gradient is not a product of the module's captured factors")


@dataclass
class Spec:
    """One layer before hooking: name, module, rule, local parameter names, module path."""
    name: str
    module: nn.Module
    rule: Rule
    params: list
    path: str


@dataclass
class Plan:
    specs: list = field(default_factory=list)
    excluded: dict = field(default_factory=dict)
    #: id(module) -> (module, its own rule, [layer names it feeds]) for forward hooks
    feeds: dict = field(default_factory=dict)
    #: modules whose forward is re-expressed (MHA, LSTM/GRU): (module, rule, [layer names])
    forwards: list = field(default_factory=list)
    batchnorm: list = field(default_factory=list)


def _real(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.requires_grad and not parametrize.is_parametrized(module, name)


def _weight_norm_hook(module) -> bool:
    return any(type(h).__name__ == "WeightNorm" for h in module._forward_pre_hooks.values())


def discover(model: nn.Module, patterns: list | None) -> Plan:
    plan = Plan()
    skip: list[str] = []
    module_specs = []  # (module, rule, [Spec]) of plain one-layer modules, before tying
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            plan.batchnorm.append(path)
        if any(path.startswith(s) for s in skip):
            continue
        rule = find_rule(module)
        if rule is None:
            continue
        expands = hasattr(rule, "expand")
        if expands:
            skip.append(path + ".")  # its children are called functionally by its forward
        params = [p for p in rule.params(module) if _real(module, p)]
        if not params:
            continue
        reason = rule.unsupported(module)
        if reason:
            names = rule.all_params(module, path) if expands else [f"{path}.{p}" for p in params]
            for n in names:
                plan.excluded[n] = reason
            continue
        if expands:
            specs = [Spec(*s) for s in rule.expand(module, path)]
            specs = [s for s in specs if _selected(s, patterns, plan)]
            if specs:
                plan.specs += specs
                plan.forwards.append((module, rule, [s.name for s in specs]))
            continue
        spec = Spec(path, module, rule, params, path)
        if _selected(spec, patterns, plan):
            module_specs.append((module, rule, spec))
    _tie(module_specs, plan)
    _exclude_rest(model, plan, patterns)
    return plan


def _selected(spec: Spec, patterns, plan: Plan) -> bool:
    if not patterns or any(fnmatch.fnmatch(n, p) for n in (spec.name, spec.path) for p in patterns):
        return True
    for p in spec.params:
        plan.excluded[f"{spec.path}.{p}"] = "not selected by `layers`"
    return False


def _tie(module_specs, plan: Plan) -> None:
    """Split each module's parameters into its own and shared ones; a shared parameter
    becomes one TiedRule layer fed by all its users (shapes must agree)."""
    users: dict[int, list] = {}
    for module, rule, spec in module_specs:
        for p in spec.params:
            users.setdefault(id(getattr(module, p)), []).append((module, rule, spec, p))
    tied_done: set[int] = set()
    for module, rule, spec in module_specs:
        feeds = plan.feeds.setdefault(id(module), (module, rule, []))[2]
        own = [p for p in spec.params if len(users[id(getattr(module, p))]) == 1]
        if own:
            plan.specs.append(Spec(spec.name, module, rule, own, spec.path))
            feeds.append(spec.name)
        for p in spec.params:
            group = users[id(getattr(module, p))]
            pid = id(getattr(module, p))
            if len(group) == 1:
                continue
            first_module, first_rule, first_spec, first_local = group[0]
            name = f"{first_spec.path}.{first_local}"
            if pid not in tied_done:
                tied_done.add(pid)
                shapes = {tuple(r.shape(m, [q])) for m, r, _, q in group}
                forms = {r.form for _, r, _, _ in group}
                if len(shapes) != 1 or len(forms) != 1:
                    where = ", ".join(f"{s.path}.{q}" for _, _, s, q in group)
                    for _, _, s, q in group:
                        plan.excluded[f"{s.path}.{q}"] = (
                            f"shared by {where} with different layouts; the hooks cannot sum "
                            "its uses (tie parameters of the same shape, e.g. embedding and head)")
                    continue
                plan.specs.append(Spec(name, first_module, TiedRule(first_local, first_rule, first_module),
                                       [first_local], first_spec.path))
            if any(s.name == name for s in plan.specs) and name not in feeds:
                feeds.append(name)


def _exclude_rest(model: nn.Module, plan: Plan, patterns) -> None:
    covered = {id(getattr(s.module, p)) for s in plan.specs for p in s.params}
    modules = dict(model.named_modules())
    seen = set()
    for pname, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in covered or pname in plan.excluded:
            continue
        owner = modules.get(pname.rpartition(".")[0])
        if ".parametrizations." in f".{pname}" or (owner is not None and _weight_norm_hook(owner)):
            plan.excluded[pname] = COMPUTED
        else:
            plan.excluded[pname] = ("not selected by `layers`" if patterns
                                    else "no per-example rule for this parameter's module")
