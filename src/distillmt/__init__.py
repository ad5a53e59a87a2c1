"""distillmt: compress an LLM translator by knowledge distillation."""

__version__ = "0.1.0"
