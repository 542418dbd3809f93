"""Task templates shared by the tests (torch-free, so any test module can import them)."""
from __future__ import annotations

# the SQuAD template of conf/prompt_learning/gpt/squad.yaml with few virtual tokens (tiny test models)
SQUAD_T = {
    "taskname": "squad",
    "prompt_template": "<|VIRTUAL_PROMPT_0|>Context: {context} Question: {question} Answer: {answer}",
    "total_virtual_tokens": 4,
    "virtual_token_splits": [4],
    "truncate_field": "context",
    "answer_only_loss": True,
    "answer_field": "answer",
}
# a second task with two virtual-token markers (incremental tasks, mixed batches)
SENT_T = {
    "taskname": "sentiment",
    "prompt_template": "<|VIRTUAL_PROMPT_0|>Review: {review}<|VIRTUAL_PROMPT_1|> Sentiment: {label}",
    "total_virtual_tokens": 6,
    "virtual_token_splits": [3, 3],
    "truncate_field": "review",
    "answer_only_loss": True,
    "answer_field": "label",
}
