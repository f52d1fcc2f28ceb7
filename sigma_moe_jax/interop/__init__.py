"""Other formats: Hugging Face Qwen3-MoE checkpoints (`hf`), and runs exported to or imported
from them (`hf_runs`)."""
