"""KV cache: committing an accepted tree path, by hand and after whole speculative runs."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax import decode, kvcache
from specblock_jax.config import ModelConfig
from specblock_jax.models.target import Target, init_params
from specblock_jax.ngram import NgramMethod
from specblock_jax.sampling import SamplingParams
from specblock_jax.tree import Tree

# The same target, prompts and run as tests/test_spec_decode.py's n-gram test, so its compile is shared.
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
N_NEW = 12
MAX_LEN = 128
PROMPTS = [[5, 9, 2], [7, 1, 33, 60, 12, 8, 41], [17], [3, 22, 50, 9, 14, 1, 6, 30, 11, 2, 48, 25]]

commit_jit = jax.jit(kvcache.commit)


def labelled_cache(lengths: list[int], max_len: int = 12) -> kvcache.KVCache:
    """Every entry says where it is: k[layer][b, :, s] = 1000 layer + 100 b + s, v = -k (head-major)."""
    b = len(lengths)
    label_BxS = 100 * np.arange(b)[:, None] + np.arange(max_len)[None, :]
    k = tuple(jnp.broadcast_to((1000 * layer + label_BxS)[:, None, :, None], (b, 2, max_len, 3)).astype(jnp.float32)
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
                    new[b, :, lengths[b] + d] = old[b, :, lengths[b] + path[b][d]]
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
    np.testing.assert_array_equal(np.asarray(out.k[1])[0, 0, :5, 0], [1000, 1001, 1002, 1004, 1007])
    np.testing.assert_array_equal(out.k[0][1], cache.k[0][1])  # the inactive row is untouched


def spec_run(target: Target, method=NgramMethod(), drafter_params=None, collect=None, feedback=None) -> decode.SpecState:
    """A greedy speculative run of PROMPTS made with the same lowering calls as `generate`, returning
    the final loop state. The default is test_spec_decode's n-gram run (`generate(..., drafter="ngram")`)."""
    request, shapes = decode.prepare(CONFIG, PROMPTS, max_new_tokens=N_NEW, sampling=SamplingParams(), max_len=MAX_LEN)
    static = dict(method=method, eos_ids=())
    init = decode.spec_init.lower(target.params, CONFIG, drafter_params, request, **static, **shapes)
    state = init.compile()(target.params, drafter_params, request)
    loop_static = dict(static)
    if collect is not None:
        state, loop_static["collect"] = state._replace(feedback=feedback), collect
    info = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    loop = decode.spec_loop.lower(target.params, CONFIG, drafter_params, info, **loop_static).compile()
    return loop(target.params, drafter_params, state)


def assert_committed_cache_is_a_prefill(state: decode.SpecState, params) -> None:
    """The committed cache holds the prompt and every generated token but the newest (the root, not
    yet written), exactly as a prefill of those tokens writes them."""
    num_B = np.asarray(state.num_generated_B)[:len(PROMPTS)]
    seqs = [p + np.asarray(state.tokens_BxN)[i, :num_B[i] - 1].tolist() for i, p in enumerate(PROMPTS)]
    lengths = [len(s) for s in seqs]
    np.testing.assert_array_equal(state.cache.lengths[:len(PROMPTS)], lengths)
    seq_BxT = np.zeros((len(seqs), max(lengths)), np.int32)
    for i, s in enumerate(seqs):
        seq_BxT[i, :len(s)] = s
    reference, _, _ = jax.jit(decode.prefill, static_argnums=(1, 4))(params, CONFIG, seq_BxT, np.array(lengths),
                                                                      MAX_LEN)
    for got, want in zip(state.cache.k + state.cache.v, reference.k + reference.v):
        for i, n in enumerate(lengths):
            np.testing.assert_allclose(got[i, :, :n], want[i, :, :n], atol=1e-5, rtol=0)


def test_committed_cache_after_speculative_run_equals_a_prefill_of_the_same_tokens():
    params = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, init_params(CONFIG, jax.random.key(0)))
    state = spec_run(Target(CONFIG, params))
    assert int(state.stats.verify_steps) > 0  # some trees were verified and committed
    assert np.asarray(state.num_generated_B).tolist() == [N_NEW] * len(PROMPTS)
    assert_committed_cache_is_a_prefill(state, params)


@dataclasses.dataclass(frozen=True)
class DecoyMethod:
    """Drafts the true greedy continuation (from its params) with a wrong sibling before every true
    node: depth d's decoy is node 2d - 1, its true token node 2d, so an accepted path of depth d sits
    at nodes 0, 2, 4, .., 2d, off the chain of indices (path[d] > d)."""

    max_depth: int
    feature_layers: ClassVar[tuple[int, ...]] = ()

    @property
    def budget(self) -> int:
        return 2 * self.max_depth

    def init(self, params, prompt_BxT, prompt_lens_B, features_BxTxF, root_B, max_len):
        return jnp.zeros(prompt_BxT.shape[:1], jnp.int32)

    def draft(self, params, state, root_B, lengths_B):
        b, d_D = root_B.shape[0], jnp.arange(1, self.max_depth + 1)
        truth_BxD = jnp.take_along_axis(params["truth_BxS"], lengths_B[:, None] + d_D, axis=1, mode="clip")
        known_BxD = lengths_B[:, None] + d_D < params["known_B"][:, None]
        true_parent_BxD = jnp.broadcast_to(jnp.where(d_D == 1, 0, 2 * d_D - 2), (b, self.max_depth))
        depth_BxD = jnp.broadcast_to(d_D, (b, self.max_depth))

        def nodes(decoy_BxD, true_BxD, root):  # [B, 1 + 2D]: the root, then decoy and true node per depth
            return jnp.concatenate([jnp.broadcast_to(root, (b, 1)).astype(true_BxD.dtype),
                                    jnp.stack([decoy_BxD, true_BxD], axis=-1).reshape(b, -1)], axis=1)

        valid = nodes(known_BxD, known_BxD, True)
        tree = Tree(tokens=nodes((truth_BxD + 1) % CONFIG.vocab_size, truth_BxD, root_B[:, None]).astype(jnp.int32),
                    parents=nodes(true_parent_BxD, true_parent_BxD, -1).astype(jnp.int32),
                    depth=nodes(depth_BxD, depth_BxD, 0).astype(jnp.int32), valid=valid,
                    scores=jnp.where(valid, -nodes(depth_BxD, depth_BxD, 0).astype(jnp.float32), -jnp.inf))
        return tree, state, jnp.ones((), jnp.int32)

    def commit(self, params, state, tree, acceptance, features_BxN1xF, lengths_B):
        return state


def count_off_chain(count, drafter_state, acceptance, logits_BxN1xV, emitted_B, running_B):
    """`collect`: steps in which a running row's accepted path left the chain of node indices."""
    off_BxD1 = acceptance.path_BxD1 > jnp.arange(acceptance.path_BxD1.shape[1])
    return count + jnp.sum(jnp.any(off_BxD1, axis=1) & running_B, dtype=jnp.int32)


def test_committed_cache_after_off_chain_accepts_equals_a_prefill_of_the_same_tokens():
    """Accepted paths through later siblings (path[d] > d) are moved into contiguous cache slots, and
    the committed cache is again a prefill of the emitted tokens."""
    params = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, init_params(CONFIG, jax.random.key(0)))
    target = Target(CONFIG, params)
    plain = decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False)
    truth_BxS = np.zeros((len(PROMPTS), MAX_LEN), np.int32)
    known_B = np.zeros(len(PROMPTS), np.int32)
    for i, (prompt, generated) in enumerate(zip(PROMPTS, plain.token_ids)):
        truth_BxS[i, :len(prompt) + N_NEW] = prompt + generated
        known_B[i] = len(prompt) + N_NEW
    state = spec_run(target, DecoyMethod(max_depth=4), dict(truth_BxS=truth_BxS, known_B=known_B),
                     collect=count_off_chain, feedback=jnp.zeros((), jnp.int32))
    assert int(state.feedback) >= len(PROMPTS)  # paths really left the chain
    assert [np.asarray(state.tokens_BxN)[i, :N_NEW].tolist() for i in range(len(PROMPTS))] == plain.token_ids
    assert int(state.iterations) < N_NEW - 1  # several tokens per step
    assert_committed_cache_is_a_prefill(state, params)
