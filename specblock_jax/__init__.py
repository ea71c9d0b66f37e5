"""specblock-jax: SpecBlock speculative decoding in JAX/Flax.

    target = specblock_jax.load_target()            # the embedded default, or a HF directory
    out = specblock_jax.generate(target, ["def fib(n):"], max_new_tokens=64)
    out = specblock_jax.generate(target, ["def fib(n):"], max_new_tokens=64,
                                 drafter=specblock_jax.load_drafter("ngram", target))
"""

from specblock_jax.decode import GenerateOutput, generate
from specblock_jax.drafter import Drafter, load_drafter
from specblock_jax.hf import load_target
from specblock_jax.models.target import Target

__all__ = ["Drafter", "GenerateOutput", "Target", "generate", "load_drafter", "load_target"]
