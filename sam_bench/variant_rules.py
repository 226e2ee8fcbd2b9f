"""Which SAM variants combine: one statement of the rules, imported by the config check
(:mod:`sam_bench.schema`, so that a sweep is validated before torch is imported) and by the
optimizer (:class:`sam_bench.optim.sam.SAM`, which therefore needs neither Hydra nor the schema).
Standard library only."""

from __future__ import annotations


def sam_variant_conflict(adaptive: bool, p: str, ascent_steps: int, second_order: bool, key: str = "") -> str | None:
    """Why these SAM variants do not combine (None when they do): the one statement of the rules,
    for the config check (:mod:`sam_bench.schema`) and for :class:`sam_bench.optim.sam.SAM`. ``key``
    prefixes each setting's name in the message ("optimizer." for the config)."""
    if ascent_steps > 1 and (p == "random" or adaptive):
        return (f"{key}ascent_steps > 1 needs {key}p=2 or inf and {key}adaptive=false (each step projects a "
                "gradient direction onto the Euclidean or ∞-ball)")
    if (adaptive or second_order) and p != "2":
        return f"{key}adaptive and {key}second_order are defined for {key}p=2 only"
    if second_order and (adaptive or ascent_steps > 1):
        return (f"{key}second_order differentiates plain SAM's ε = ρg/‖g‖ (App. C.4): use it with "
                f"{key}adaptive=false and {key}ascent_steps=1")
    return None
