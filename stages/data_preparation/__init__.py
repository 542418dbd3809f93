"""data_preparation stage: fetch SQuAD v1.1 and turn it into prompt-learning JSONL (no torch needed)."""
