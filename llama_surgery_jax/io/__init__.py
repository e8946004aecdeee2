"""Reading and writing: the text a model is scored or trained on (corpora), and files written whole (files)."""
