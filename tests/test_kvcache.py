"""KV cache: committing an accepted tree path, by hand and after a whole speculative run."""

import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax import decode, kvcache
from specblock_jax.config import ModelConfig
from specblock_jax.models.target import Target, init_params
from specblock_jax.ngram import NgramMethod
from specblock_jax.sampling import SamplingParams

# The same target, prompts and run as tests/test_spec_decode.py's n-gram test, so its compile is shared.
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
N_NEW = 12
MAX_LEN = 128
PROMPTS = [[5, 9, 2], [7, 1, 33, 60, 12, 8, 41], [17], [3, 22, 50, 9, 14, 1, 6, 30, 11, 2, 48, 25]]

commit_jit = jax.jit(kvcache.commit)


def labelled_cache(lengths: list[int], max_len: int = 12) -> kvcache.KVCache:
    """Every entry says where it is: k[layer][b, s] = 1000 layer + 100 b + s, v = -k."""
    b = len(lengths)
    label_BxS = 100 * np.arange(b)[:, None] + np.arange(max_len)[None, :]
    k = tuple(jnp.broadcast_to((1000 * layer + label_BxS)[:, :, None, None], (b, max_len, 2, 3)).astype(jnp.float32)
              for layer in range(2))
    return kvcache.KVCache(k=k, v=tuple(-x for x in k), lengths=jnp.array(lengths, jnp.int32))


def reference_commit(cache: kvcache.KVCache, path, length, active) -> tuple[list[np.ndarray], np.ndarray]:
    """One row and one entry at a time, reading sources from an untouched copy."""
    before = [np.asarray(x) for x in cache.k + cache.v]
    after = [x.copy() for x in before]
    lengths = np.asarray(cache.lengths).copy()
    for b in range(len(lengths)):
        if active[b]:
            for d in range(length[b] + 1):
                for old, new in zip(before, after):
                    new[b, lengths[b] + d] = old[b, lengths[b] + path[b][d]]
            lengths[b] += length[b] + 1
    return after, lengths


def test_commit_moves_each_accepted_path_to_contiguous_slots():
    cache = labelled_cache([2, 5, 0, 3])
    # Row 0 moves slots 4 -> 3 and 7 -> 4 (sources and destinations overlap); row 1 is inactive;
    # row 2 starts at slot 0; row 3 accepts nothing (the root stays where it was written).
    path = [[0, 2, 5, 0], [0, 1, 2, 3], [0, 1, 3, 6], [0, 0, 0, 0]]
    length, active = [2, 3, 3, 0], [True, False, True, True]
    out = commit_jit(cache, jnp.array(path, jnp.int32), jnp.array(length, jnp.int32), jnp.array(active))
    expected, lengths = reference_commit(cache, path, length, active)
    for got, want in zip(out.k + out.v, expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(out.lengths, lengths)
    assert lengths.tolist() == [5, 5, 4, 4]
    # Row 0's committed labels: the old prefix, then the path's scratch slots in order.
    np.testing.assert_array_equal(np.asarray(out.k[1])[0, :5, 0, 0], [1000, 1001, 1002, 1004, 1007])
    np.testing.assert_array_equal(out.k[0][1], cache.k[0][1])  # the inactive row is untouched


def ngram_run(target: Target) -> decode.SpecState:
    """The greedy n-gram run of test_spec_decode (`generate(..., drafter="ngram")`), made with the same
    lowering calls as `generate`, returning the final loop state."""
    prompt_BxT = np.zeros((len(PROMPTS), 64), np.int32)
    for i, p in enumerate(PROMPTS):
        prompt_BxT[i, :len(p)] = p
    lens_B = np.array([len(p) for p in PROMPTS], np.int32)
    static = dict(method=NgramMethod(), sampling=SamplingParams(), eos_ids=())
    rng = jax.random.key(0)
    init = decode.spec_init.lower(target.params, CONFIG, None, prompt_BxT, lens_B, rng, max_new_tokens=N_NEW,
                                  max_len=MAX_LEN, **static)
    loop = decode.spec_loop.lower(target.params, CONFIG, None, init.out_info, **static).compile()
    return loop(target.params, None, init.compile()(target.params, None, prompt_BxT, lens_B, rng))


def test_committed_cache_after_speculative_run_equals_a_prefill_of_the_same_tokens():
    params = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, init_params(CONFIG, jax.random.key(0)))
    state = ngram_run(Target(CONFIG, params))
    assert int(state.stats.verify_steps) > 0  # some trees were verified and committed
    num_B = np.asarray(state.num_generated_B)
    assert num_B.tolist() == [N_NEW] * len(PROMPTS)
    # Committed: the prompt and every generated token but the newest (the root, not yet written).
    seqs = [p + np.asarray(state.tokens_BxN)[i, :num_B[i] - 1].tolist() for i, p in enumerate(PROMPTS)]
    lengths = [len(s) for s in seqs]
    np.testing.assert_array_equal(state.cache.lengths, lengths)
    seq_BxT = np.zeros((len(seqs), max(lengths)), np.int32)
    for i, s in enumerate(seqs):
        seq_BxT[i, :len(s)] = s
    reference, _, _ = jax.jit(decode.prefill, static_argnums=(1, 4))(params, CONFIG, seq_BxT, np.array(lengths),
                                                                      MAX_LEN)
    for got, want in zip(state.cache.k + state.cache.v, reference.k + reference.v):
        for i, n in enumerate(lengths):
            np.testing.assert_allclose(got[i, :n], want[i, :n], atol=1e-5, rtol=0)
