"""GPT-2 models on keras-hub for Sophia pretraining."""
