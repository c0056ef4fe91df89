"""Student and guide as sentence-transformers models: spec, loading, the Encoder, export, prompts,
LoRA, the self-guide, the model card, the best model's folder."""
