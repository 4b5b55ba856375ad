"""Map the Recorder's convenience keywords to registered extensions.

`Recorder(..., grad_norms=True, grad_projection=1024)` is easier to type than building
extension objects; this table is the one place that knows which keyword feeds which
extension, so the Recorder itself stays free of extension-specific code.
"""
from __future__ import annotations

import importlib

# keyword -> (extension registry name, module that registers it, constructor argument)
KEYWORDS = {
    "grad_norms": ("gradients", "dynascope.recorder.gradients", "norms"),
    "grad_projection": ("gradients", "dynascope.recorder.gradients", "projection_dim"),
    "grad_seed": ("gradients", "dynascope.recorder.gradients", "seed"),
    "grad_layers": ("gradients", "dynascope.recorder.gradients", "layers"),
    "grad_fused": ("gradients", "dynascope.recorder.gradients", "fused"),
    "grad_gram": ("gradients", "dynascope.recorder.gradients", "gram"),
    "grad_probe_gram_budget": ("gradients", "dynascope.recorder.gradients", "probe_gram_budget"),
    "param_stats": ("params", "dynascope.recorder.params", None),
    "param_stats_every": ("params", "dynascope.recorder.params", "every"),
    "snapshot_params": ("params", "dynascope.recorder.params", "snapshot_params"),
    "snapshot_every": ("params", "dynascope.recorder.params", "snapshot_every"),
    "activations": ("activations", "dynascope.recorder.activations", "layers"),
    "activation_pool": ("activations", "dynascope.recorder.activations", "pool"),
    "activation_max_units": ("activations", "dynascope.recorder.activations", "max_units"),
    "activation_dtype": ("activations", "dynascope.recorder.activations", "dtype"),
    "activation_sequence_pool": ("activations", "dynascope.recorder.activations", "sequence_pool"),
}
# an extension is built when its enabling keyword is truthy
ENABLING = {"gradients": ("grad_norms", "grad_projection", "grad_gram"), "params": ("param_stats",),
            "activations": ("activations",)}
# constructor arguments the keywords imply when omitted (asking for norms only must not
# switch projections on), and keyword defaults: parameter statistics are cheap, so on
DEFAULT_ARGS = {"gradients": {"norms": False, "projection_dim": None}}
DEFAULT_KEYWORDS = {"param_stats": True}


def build(options: dict, registry: dict, given=()) -> list:
    """Extensions for the keyword options; a keyword default never duplicates an extension
    the caller passed as an instance (`given`)."""
    unknown = set(options) - set(KEYWORDS)
    if unknown:
        raise TypeError(f"Recorder got unknown keyword(s) {sorted(unknown)}; "
                        f"known: {sorted(KEYWORDS)}")
    given_names = {getattr(e, "name", None) for e in given}
    options = {**{k: v for k, v in DEFAULT_KEYWORDS.items() if KEYWORDS[k][0] not in given_names}, **options}
    kwargs: dict[str, dict] = {name: dict(args) for name, args in DEFAULT_ARGS.items()}
    for key, value in options.items():
        name, module, arg = KEYWORDS[key]
        kwargs.setdefault(name, {})
        if arg is not None:
            kwargs[name][arg] = value
    built = []
    for name, enabling in ENABLING.items():
        if not any(options.get(k) for k in enabling):
            continue
        module = next(m for k, (n, m, _) in KEYWORDS.items() if n == name)
        importlib.import_module(module)
        if name not in registry:
            raise RuntimeError(f"extension '{name}' is not available in this installation")
        built.append(registry[name](**kwargs[name]))
    return built
