"""``prompt_learning.trainer.compile``: the frozen model's decoder layers run through ``torch.compile`` in passes without a KV cache.

Why: in a plain training step on CPU the matmuls already run near this machine's matmul rate; what is left is
the elementwise work around them (attention scale, mask and softmax over B x H x L^2 scores, SiLU x up, RMSNorm,
RoPE, residual adds), each a separate pass over memory in eager mode. Inductor fuses those into a few loops and
leaves the matmuls to the same BLAS. Measured on SmolLM2-135M, the train bench's batches (``bench/train_vs_peft.py``,
side ``ours-plain-compiled``): plain step 40.1 -> 36.6 s per pass (medians; 1.10x per round), 84.4 % of the matmul
peak against 77.0 %; the first step compiles (about 40 s extra with an empty inductor cache).

What is compiled: each decoder layer (the model's ``_no_split_modules`` classes, e.g. ``LlamaDecoderLayer``), with
dynamic shapes, so every layer and every padded length reuse one graph. Passes that carry a KV cache (shared-context
prefix batches, generation) run the eager layer: the cache update makes dynamo specialise on the layer index, i.e.
one compilation per layer (keeping the update out of the graph avoids that, but the shared step then measured
0.97x, so it is not done). Results equal the eager ones up to float rounding (fused loops sum in another order);
tests/stages/prompt_learning/test_layer_compile.py bounds the difference.

Inductor on CPU writes C++ and builds it with the system compiler, so a job that asks for it checks for one first.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable

from stages.common.errors import UserError

log = logging.getLogger("promptlaunch.prompt_learning")


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks of a Hugging Face model (classes named in its ``_no_split_modules``), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def check_compiler(key: str = "prompt_learning.trainer.compile", fix: str | None = None) -> str:
    """Path of the C++ compiler inductor will call (``$CXX`` or g++/c++/clang++); UserError if there is none."""
    for name in [os.environ.get("CXX")] + ["g++", "c++", "clang++"]:
        if name and shutil.which(name):
            return str(shutil.which(name))
    raise UserError(f"{key}: torch.compile on CPU builds C++ kernels, and this node has no C++ compiler (g++, c++, "
                    f"clang++ or $CXX); install one (apt-get install g++) or {fix or f'set {key}=false'}")


# the keyword a decoder layer receives its KV cache under: ``past_key_values`` up to transformers 5.24,
# ``cache`` from 5.25 on (``past_key_value`` in 4.x)
CACHE_KWARGS = ("past_key_values", "cache", "past_key_value")


def carries_cache(kwargs: dict[str, Any]) -> bool:
    """Whether a decoder layer call carries a KV cache, under any of the names transformers has used."""
    return any(kwargs.get(name) is not None for name in CACHE_KWARGS)


class LayerCompiler:
    """Compiled forwards of a model's decoder layers that can be switched on and off (the bench times both on one
    model). Compilation itself happens lazily, on the first pass with the layers switched on."""

    def __init__(self, model: Any) -> None:
        import torch

        self.layers = decoder_layers(model)
        if not self.layers:
            raise UserError(f"prompt_learning.trainer.compile: {type(model).__name__} names no repeated decoder layer "
                            f"(_no_split_modules); set prompt_learning.trainer.compile=false")
        self._compiled = [self._dispatch(layer.forward, torch.compile(layer.forward, dynamic=True)) for layer in self.layers]

    @staticmethod
    def _dispatch(eager: Callable[..., Any], compiled: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            # a KV cache would make dynamo recompile per layer: those passes stay eager
            return eager(*args, **kwargs) if carries_cache(kwargs) else compiled(*args, **kwargs)
        return forward

    def enable(self) -> int:
        """Switch every layer to its compiled forward; returns how many layers."""
        for layer, fwd in zip(self.layers, self._compiled):
            layer.forward = fwd
        return len(self.layers)

    def disable(self) -> None:
        """Back to the eager forwards."""
        for layer in self.layers:
            layer.__dict__.pop("forward", None)


def compile_layers(model: Any, key: str = "prompt_learning.trainer.compile") -> LayerCompiler:
    """Switch the decoder layers of ``model`` to compiled forwards (before any forward pass) and say so."""
    compiler = LayerCompiler(model)
    n = compiler.enable()
    log.info("%s: %d decoder layers compiled with torch.compile (dynamic shapes) for passes without a KV cache; "
             "the first step pays the compilation", key, n)
    return compiler
