"""Component: train_tokenizer."""
