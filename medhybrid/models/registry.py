"""The model registry: small factory functions registered by name, built with :func:`create_model`.

Modelled on timm's registry: a factory is a plain function returning a model, decorated with
:func:`register_model` and the facts a user filters on (family, spatial dims, tasks). The decorator
records the entry and returns the function unchanged, so factories stay callable on their own.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from medhybrid.errors import DuplicateModelError, ModelError, UnknownModelError

if TYPE_CHECKING:
    from medhybrid.models.base import MedModel

FAMILIES = ("hybrid", "resnet", "transformer", "unetr", "swinunetr", "unet")
TASKS = ("classification", "segmentation")

FactoryT = TypeVar("FactoryT", bound=Callable[..., "MedModel"])


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one factory without building it.

    Attributes:
        name: registry name, e.g. ``hybrid_r18_3d``.
        factory: the function that builds the model from keyword overrides.
        family: one of :data:`FAMILIES`.
        spatial_dims: 2 or 3.
        tasks: the tasks the model can do (subset of :data:`TASKS`).
        fixed_size: the model is built for one input size (pass ``img_size=``); others accept any size.
        tiny: a test-sized configuration.
        description: first line of the factory's docstring.
    """

    name: str
    factory: Callable[..., MedModel]
    family: str
    spatial_dims: int
    tasks: tuple[str, ...]
    fixed_size: bool = False
    tiny: bool = False
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    *,
    family: str,
    spatial_dims: int,
    tasks: tuple[str, ...],
    fixed_size: bool = False,
    tiny: bool = False,
) -> Callable[[FactoryT], FactoryT]:
    """Register a model factory under its function name.

    Raises:
        DuplicateModelError: a factory with this name is already registered.
        ModelError: family, spatial dims or tasks are not known values.
    """
    if family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}", fix=f"use one of {', '.join(FAMILIES)}")
    if spatial_dims not in (2, 3):
        raise ModelError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if not tasks or any(t not in TASKS for t in tasks):
        raise ModelError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")

    def decorator(factory: FactoryT) -> FactoryT:
        name = factory.__name__
        if name in _REGISTRY:
            raise DuplicateModelError(
                f"model {name!r} is already registered (by {_REGISTRY[name].factory.__module__})",
                fix="give the factory function a unique name",
            )
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelEntry(
            name=name,
            factory=factory,
            family=family,
            spatial_dims=spatial_dims,
            tasks=tuple(tasks),
            fixed_size=fixed_size,
            tiny=tiny,
            description=doc[0] if doc else "",
        )
        return factory

    return decorator


def _ensure_loaded() -> None:
    # Importing the modules runs their @register_model decorators; done lazily to avoid import cycles.
    from medhybrid.models import baselines, hybrid  # noqa: F401


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``.

    Raises:
        UnknownModelError: no model has this name; the message lists the close matches.
    """
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `medhybrid models` for the list"
        raise UnknownModelError(f"no model named {name!r}", fix=hint) from None


def list_models(
    *,
    family: str | None = None,
    spatial_dims: int | None = None,
    task: str | None = None,
    include_tiny: bool = True,
) -> list[str]:
    """Registered model names (sorted), optionally filtered by family, spatial dims and task."""
    _ensure_loaded()
    return sorted(
        e.name
        for e in _REGISTRY.values()
        if (family is None or e.family == family)
        and (spatial_dims is None or e.spatial_dims == spatial_dims)
        and (task is None or task in e.tasks)
        and (include_tiny or not e.tiny)
    )


def create_model(name: str, **kwargs: object) -> MedModel:
    """Build the registered model ``name``; keyword arguments override the variant's defaults.

    Raises:
        UnknownModelError: no model has this name.
        ModelError: the overrides do not fit the model.
    """
    entry = get_entry(name)
    model = entry.factory(**kwargs)
    model.entry = entry
    return model
