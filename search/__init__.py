"""soupsearch: search for the best merge of fine-tuned LLMs that share a base model.

``import search`` is cheap: heavy dependencies (torch, transformers, Ray, lm-eval)
are imported lazily by the modules that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"
