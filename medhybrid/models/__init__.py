"""The model family: hybrids (ResNet + Transformer) and the baselines they are measured against."""

from medhybrid.models.base import MedModel, count_parameters
from medhybrid.models.registry import FAMILIES, TASKS, ModelEntry, create_model, get_entry, list_models, register_model

__all__ = [
    "FAMILIES",
    "TASKS",
    "MedModel",
    "ModelEntry",
    "count_parameters",
    "create_model",
    "get_entry",
    "list_models",
    "register_model",
]
