"""Model zoo. Importing this package registers every family (one file each)."""

from fashionlabel.models import hsnet, repvgg, resnet, small, xception_se  # noqa: F401  (registers models)
from fashionlabel.models._registry import create_model, list_models, register_model
from fashionlabel.models.layers import reparameterize_model

__all__ = ["create_model", "list_models", "register_model", "reparameterize_model"]
