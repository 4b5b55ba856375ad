"""Which parameters an analysis runs with, so that figures, reports and `dynascope analyze`
never disagree.

Inside `with parameters.use(overrides):` every registered analysis called by a figure
(not the analyses it calls in turn) resolves its keyword parameters as

    analysis defaults  <  saved result's parameters  <  overrides (--param NAME.KEY=VALUE)

with keywords passed explicitly at the call site beating saved ones (they are that figure's
convention) but not overrides (the user asked). When the store holds a saved result computed
with exactly the resolved parameters on the same committed rows, it is loaded instead of
recomputed. Each resolution is logged, so a figure can state what it was drawn with.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

_CTX: contextvars.ContextVar["Resolution | None"] = contextvars.ContextVar("dynascope_parameters", default=None)


def json_safe(value):
    """Parameters as they survive JSON attrs: tuples become lists, inf/nan become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass
class Use:
    """One analysis as a figure used it: its full parameters and where the result came from."""
    name: str
    params: dict
    source: str  # "computed" or "saved"


@dataclass
class Resolution:
    overrides: dict[str, dict]
    use_saved: bool = True
    uses: list[Use] = field(default_factory=list)
    depth: int = 0
    _saved: dict = field(default_factory=dict)

    def saved(self, run, name: str):
        """(attrs, loader) of a saved, up-to-date result, or None."""
        key = (str(run.path), name)
        if key not in self._saved:
            self._saved[key] = _saved_entry(run, name) if self.use_saved else None
        return self._saved[key]


def _saved_entry(run, name):
    from .run import _open_group

    ds = _open_group(run.path, f"analysis/{name}")
    if ds is None:
        return None
    committed = ds.attrs.get("run_committed")
    if committed is not None and json_safe(committed) != json_safe(run.committed):
        return None  # saved before the run grew (resumed): stale
    return ds


def _bind(sig: inspect.Signature, run, kwargs) -> dict:
    bound = sig.bind(run, **kwargs)
    bound.apply_defaults()
    out = {}
    for k, v in list(bound.arguments.items())[1:]:
        if sig.parameters[k].kind == inspect.Parameter.VAR_KEYWORD:
            out.update(v)
        else:
            out[k] = v
    return out


def resolving(name: str, func):
    """Wrap a registered analysis so that calls inside `use()` resolve their parameters."""
    sig = inspect.signature(func)
    names = [k for k, p in list(sig.parameters.items())[1:] if p.kind != p.VAR_KEYWORD]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())

    def resolve(ctx, run, args, kwargs) -> tuple[dict, object]:
        chosen = {**dict(zip(names, args)), **kwargs}
        explicit = set(chosen)
        saved = ctx.saved(run, name)
        if saved is not None:
            for k, v in (saved.attrs.get("effective_params") or {}).items():
                if (k in names or open_ended) and k not in explicit:
                    chosen[k] = v
        for k, v in ctx.overrides.get(name, {}).items():
            if k not in names and not open_ended:
                raise ValueError(unknown_message(f"parameter of {name}", k, names))
            chosen[k] = v
        return chosen, saved

    @functools.wraps(func)
    def wrapper(run, *args, **kwargs):
        ctx = _CTX.get()
        if ctx is None or ctx.depth > 0:
            return func(run, *args, **kwargs)
        chosen, saved = resolve(ctx, run, args, kwargs)
        effective = json_safe(_bind(sig, run, chosen))
        ctx.depth += 1
        try:
            if saved is not None and json_safe(saved.attrs.get("effective_params")) == effective:
                result, source = saved, "saved"
            else:
                result, source = func(run, **chosen), "computed"
        finally:
            ctx.depth -= 1
        ctx.uses.append(Use(name, effective, source))
        result.attrs.setdefault("effective_params", effective)
        return result

    def params_for(run, **kwargs) -> dict:
        """The parameters a call with `kwargs` would run with here (nothing computed)."""
        ctx = _CTX.get()
        if ctx is None:
            return _bind(sig, run, dict(kwargs))
        params = _bind(sig, run, resolve(ctx, run, (), kwargs)[0])
        ctx.uses.append(Use(name, json_safe(params), "stated"))
        return params

    wrapper.params_for = params_for
    wrapper.__wrapped_analysis__ = func
    return wrapper


@contextmanager
def use(overrides: dict[str, dict] | None = None, use_saved: bool = True):
    """Resolve analysis parameters (see the module docstring) inside the block; yields the
    `Resolution`, whose `.uses` lists what was computed or loaded, in order."""
    res = Resolution({k: dict(v) for k, v in (overrides or {}).items()}, use_saved)
    token = _CTX.set(res)
    try:
        yield res
    finally:
        _CTX.reset(token)


def current() -> Resolution | None:
    return _CTX.get()


def unknown_message(what: str, name: str, known) -> str:
    """'unknown X 'nam'; did you mean 'name'? known: ...' (difflib close matches)."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    if close:
        return f"unknown {what} {name!r}; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"unknown {what} {name!r} (known: {', '.join(sorted(known))}; `dynascope list` describes them)"
