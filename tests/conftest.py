"""Shared test fixtures, one on-disk XLA compilation cache for the whole run, and XLA's backend
optimizations off (the environment carries both to xdist workers and subprocesses)."""

import contextlib
import os
import shutil
import tempfile

import jax
import pytest

from specblock_jax.config import ModelConfig
from specblock_jax.models.target import Target, init_params


CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"
FAST_COMPILE = "--xla_backend_optimization_level=0"


def pytest_configure(config):
    """Many tests compile the same programs (a training run and its resume, each module after
    `_release_compiled_code`, the xdist workers, the CLI subprocesses): a run-wide persistent cache
    compiles each once. The environment carries it to workers and subprocesses; an existing
    JAX_COMPILATION_CACHE_DIR is used as it is."""
    # Tests run tiny models: compiling dominates, and LLVM's optimizations cost a third of it.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    if CACHE_DIR not in os.environ:
        config.xla_cache_dir = tempfile.mkdtemp(prefix="specblock-jax-tests-xla-")
        os.environ[CACHE_DIR] = config.xla_cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_DIR])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


# The slowest test files, longest first (`--durations` on 2 cores): they start before the others
# (`make test` turns off xdist's ordering by test count) so that no worker is left running a long file
# alone at the end of the run.
SLOWEST_FIRST = ("test_train_drafter.py", "test_bench.py", "test_adapt.py", "test_specblock_draft.py",
                 "test_gguf.py", "test_sharding.py", "test_spec_decode.py", "test_notebook.py", "test_eagle3.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's order is kept


def pytest_unconfigure(config):
    if hasattr(config, "xla_cache_dir"):
        shutil.rmtree(config.xla_cache_dir, ignore_errors=True)


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
    """A context manager counting the programs XLA had to provide inside its block, compiled or read
    from the persistent cache (JAX's own events): `with count_compiles() as n: ...`, then `n[0]`."""
    return _count_compiles


@contextlib.contextmanager
def _count_compiles():
    count = [0]

    def compiled(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    def cached(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(compiled)
    jax.monitoring.register_event_listener(cached)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
        jax.monitoring.unregister_event_listener(cached)
