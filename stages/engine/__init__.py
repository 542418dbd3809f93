"""The prompted-model engine: the library under the stages. Evaluation and the benches import it, never the
training stage; it imports nothing of the stages above it (only ``stages.common``).

    template.py        NeMo-style task templates: ``<|VIRTUAL_PROMPT_n|>`` markers and fields, checked
    examples.py        template + record -> token example with virtual slots, or a generation prompt
    dataset.py         JSONL records read and checked, sampled, tokenised into examples
    collate.py         examples -> padded batches (plain and shared-prefix)
    prompts.py         the prompt store (one table per task; prompt tuning and the p-tuning encoder)
    base_model.py      base model loading: HF folders, hub ids, GGUF and NeMo .nemo converted once; fingerprints; freezing
    nemo/              NeMo 1.x ``.nemo`` base models (GPT, T5/mT5) read without NeMo; NeMo prompt-learning files
    megatron_t5.py     NeMo's legacy Megatron T5 as a ``PreTrainedModel`` of ours (no HF class computes it)
    family/            model-family adapters (``gpt.py``, ``t5.py``) behind the ``Family`` protocol; ``family_for``
    shared_prefix.py   shared-context prefixes run once per batch (training loss and generation prefill)
    decoding.py        greedy decoding with prompt lookup
    few_rows.py        the few-row linear kernel for decoding passes
    artifact.py        the prompt artifact: save, load, check against the base model
    export.py          exports for other tools (numpy, PEFT) and what to feed them
    prompted_model.py  ``PromptedModel``: a frozen base model + tuned prompts, batched greedy answers
"""
