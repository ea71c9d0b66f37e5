"""Shared test fixtures."""

import contextlib

import jax
import pytest

from specblock_jax.config import ModelConfig
from specblock_jax.models.target import Target, init_params


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after every test module: a full run compiles thousands of them,
    and holding them all grows the process past what a 24 GiB CI machine gives XLA's compiler."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def peaked_target():
    """A tiny random target whose matrices are scaled up: peaked next-token distributions, so greedy
    argmax has clear margins instead of near-uniform logits where rounding could flip a token."""
    def make(config: ModelConfig, scale: float = 10.0) -> Target:
        params = init_params(config, jax.random.key(0))
        return Target(config, jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, params))
    return make


@pytest.fixture
def count_compiles():
    """A context manager counting XLA compilations inside its block (JAX's own backend-compile event):
    `with count_compiles() as n: ...`, then `n[0]`."""
    return _count_compiles


@contextlib.contextmanager
def _count_compiles():
    count = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
