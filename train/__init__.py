"""Data, tokenizer and training programs around keras_sophia."""
