"""Test fixtures and helpers shared by the test modules (no test module imports another one). Pytest fixtures live in
the ``conftest.py`` nearest to their users; everything else lives here, one module per kind of thing:

    paths.py             ROOT and the test data folders (tests/fixtures, tests/golden)
    launcher.py          compose a config, run main.py as a user would, main.py's bad command lines
    templates.py         the task templates of the tiny models (SQUAD_T, SENT_T)
    records.py           seeded toy records and JSONL files of them
    tiny_models.py       the tiny random llama / t5 / mt5 builder (also ``python3 -m tests.support.tiny_models``)
    training.py          a prompt_learning stage config, training, the artifact's tables, the incremental-task check
    engine.py            engine helpers on the tiny decoder-only model (frozen model, prompt store, PromptedModel)
    artifacts.py         a prompt artifact for a tiny model, written by the engine without training
    evaluation.py        the evaluation stage with a fake PromptedModel
    data_preparation.py  the data_preparation stage on tests/fixtures/squad_tiny
    peft.py              the PEFT hand-off as a user runs it
    dist.py              the test device (PROMPTLAUNCH_TEST_DEVICE: gloo/CPU or NCCL/CUDA), the multi-process runner and the
                         parallel-engine batches and reference
    cluster.py           job specs and scripts for the executor tests, fake commands, the fake bcprun
    fault_runner.py      a stage run with faults injected at exact points (run as a script)
    fake_bcprun/bcprun   the test double of NVIDIA's bcprun
"""
