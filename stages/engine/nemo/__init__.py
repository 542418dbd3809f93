"""NeMo 1.x ``.nemo`` GPT and T5/mT5 base models, read without NeMo or Megatron and written as a Hugging Face folder.

Why here: NVIDIA froze prompt learning at NeMo 1.x, so the users of the NeMo launcher hold ``.nemo`` base models;
the engine only tunes Hugging Face models. This package turns one ``.nemo`` (a tar, gzip or not, or its unpacked
folder) into the files of an exactly equivalent HF model; :mod:`stages.engine.base_model` owns the cache and the
atomic write, as for GGUF files.

  * :mod:`.archive`: the container (tar / folder), its members and the ``nemo:<uuid>_<name>`` artifacts;
  * :mod:`.gpt_config`: ``model_config.yaml`` with NeMo's defaults, and the one architecture mapping
    (GPT-2 or Llama, anything else refused with the config key and value);
  * :mod:`.weights`: the weight files (``model_weights.ckpt``, ``mp_rank_XX/``, ``tp_rank_XX_pp_rank_YYY/``),
    legacy and mcore key names, merged into one canonical state;
  * :mod:`.dist_ckpt`: the distributed checkpoint ``model_weights/`` (``torch_dist`` backend);
  * :mod:`.to_hf`: the canonical state as HF tensors, config and tokenizer (a T5 config goes to :mod:`.t5_to_hf`);
  * :mod:`.t5_config`, :mod:`.t5_weights`, :mod:`.t5_tokenizer`, :mod:`.t5_to_hf`: the NeMo launcher's legacy
    T5/mT5 (``enc_dec_model.*``), refused unless it is exactly what
    :class:`stages.engine.megatron_t5.MegatronT5ForConditionalGeneration` computes; the tokenizer rebuilt with
    NeMo's ids;
  * :mod:`.prompts`: NeMo prompt-learning results (``megatron_gpt_prompt.nemo``) read as prompt tables, and the
    ``export/nemo`` files written.

Not read yet: pipeline-parallel and ``mcore_t5`` T5 files, the ``zarr`` backend of ``model_weights/``, legacy TransformerEngine names
(``layernorm_qkv``, ``layernorm_mlp``), ``megatron_legacy`` QKV order, virtual pipeline stages.
"""
