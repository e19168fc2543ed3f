"""Model zoo. Importing this package registers every family."""

from fashionlabel.models import small  # noqa: F401  (registers models)
from fashionlabel.models._registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
