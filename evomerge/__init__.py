"""evomerge: search for the best way to merge fine-tuned language models."""

import os as _os

# Never reach for the Hugging Face Hub: everything evomerge reads is local.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
