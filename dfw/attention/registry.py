"""One way to register the parts the fast-weight core composes: a subclass with a `name` enters its family.

The three families are update rules (`UPDATE_RULES`, update_rules/), feature maps (`FEATURE_MAPS`,
feature_maps.py) and normalisations (`NORMALIZATIONS`, normalizations.py). Each family's base class
derives from `Registered` and sets `registry` to its dict; defining a subclass of it with a `name` class
attribute adds the subclass under that name (the value of `attention.update_rule`, `.feature_map`,
`.normalization`). A class without a `name` of its own (a shared base, such as `RandomFeatureMap`) is not
registered. Redefining a name replaces the entry.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Registered:
    """Mixin of a family's base class: `registry` is the family's dict, `name` a member's key in it."""

    registry: ClassVar[dict[str, Any]]
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.registry[cls.name] = cls
