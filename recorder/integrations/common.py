"""What the framework integrations share: picking ids and targets out of a batch, and
running one recorded step across the framework's hooks (forward here, backward there)."""
from __future__ import annotations

from collections.abc import Mapping


def pick(batch, selector, what: str):
    """`selector` is a tuple position, a dict key or a callable(batch)."""
    if callable(selector):
        return selector(batch)
    try:
        return batch[selector]
    except (KeyError, IndexError, TypeError):
        keys = f"keys {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
        raise ValueError(f"cannot find the {what} in the batch ({keys}) under {selector!r}; name them "
                         f"with {what}=<key, position or callable>, e.g. {what}='example_id'") from None


class OpenStep:
    """A `rec.step` entered in one hook and closed in another (after backward)."""

    def __init__(self):
        self.ctx = None

    def open(self, rec, ids, targets):
        self.discard()
        self.ctx = rec.step(example_ids=ids, targets=targets)
        self.ctx.__enter__()
        return self.ctx

    def close(self) -> bool:
        if self.ctx is None or not self.ctx._recorded:
            self.ctx = None
            return False
        ctx, self.ctx = self.ctx, None
        ctx.__exit__(None, None, None)
        return True

    def discard(self) -> None:
        self.ctx = None
