"""hf_mim: masked image modeling with visual tokenizers for the Hugging Face ecosystem.

Importing the package registers every hf_mim config, model and image processor with the
transformers Auto classes.
"""

from .models import *  # noqa: F401,F403
from .models import __all__ as _model_names
from .families import register_all

register_all()

__version__ = "0.1.0"
__all__ = [*_model_names, "__version__"]
