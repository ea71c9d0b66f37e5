"""specblock-jax: SpecBlock speculative decoding in JAX/Flax.

    target = specblock_jax.load_target()            # the embedded default, or a HF directory
    out = specblock_jax.generate(target, ["def fib(n):"], max_new_tokens=64)
"""

from specblock_jax.decode import GenerateOutput, generate
from specblock_jax.hf import load_target
from specblock_jax.models.target import Target

__all__ = ["GenerateOutput", "Target", "generate", "load_target"]
