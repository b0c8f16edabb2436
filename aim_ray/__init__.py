"""aim-ray: Ray-distributed merging of fine-tuned LLM experts with Activation-Informed Merging (AIM)."""

__version__ = "0.1.0"
