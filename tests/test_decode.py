"""Plain decoding: exact against a cache-free reference and transformers, row independence, per-row
EOS stop, the sampling path, and input validation."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from specblock_jax import decode
from specblock_jax.config import ModelConfig
from specblock_jax.models.target import Target
from specblock_jax.sampling import SamplingParams

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
N_NEW = 12
PROMPTS = [[5, 9, 2], [7, 1, 33, 60, 12, 8, 41], [17], [3, 22, 50, 9, 14, 1, 6, 30, 11, 2, 48, 25]]


@pytest.fixture(scope="module")
def target(peaked_target) -> Target:
    return peaked_target(CONFIG)


@pytest.fixture(scope="module")
def batch_greedy(target) -> decode.GenerateOutput:
    return decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=64, stop_on_eos=False)


def reference_greedy(target: Target, prompt: list[int], n: int, width: int = 64) -> list[int]:
    """Re-run the full causal forward (no cache) on the growing sequence and take the argmax. The
    sequence is right-padded to a fixed width: causality makes the padding invisible, and one shape
    means one compile."""
    seq = list(prompt)
    for _ in range(n):
        ids = np.zeros((1, width), np.int32)
        ids[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(target.logits(ids)[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_equals_cache_free_reference(target, batch_greedy):
    for prompt, generated in zip(PROMPTS, batch_greedy.token_ids):
        assert generated == reference_greedy(target, prompt, N_NEW)
    assert batch_greedy.stats["new_tokens"] == [N_NEW] * len(PROMPTS)
    assert batch_greedy.stats["iterations"] == N_NEW - 1
    assert batch_greedy.texts is None


def test_batch_rows_equal_each_prompt_alone(target, batch_greedy):
    for prompt, generated in zip(PROMPTS, batch_greedy.token_ids):
        alone = decode.generate(target, [prompt], max_new_tokens=N_NEW, max_len=64, stop_on_eos=False)
        assert alone.token_ids == [generated]


def test_per_row_eos_stop(target, batch_greedy):
    rows = batch_greedy.token_ids
    # An eos id that some row emits early (first time at step j) and at least one other row never emits.
    eos, row, j = next((t, r, seq.index(t)) for r, seq in enumerate(rows) for t in seq[:N_NEW // 2]
                       if any(t not in other for other in rows))
    stopping = Target(dataclasses.replace(CONFIG, eos_token_ids=(eos,)), target.params)
    out = decode.generate(stopping, PROMPTS, max_new_tokens=N_NEW, max_len=64)
    expected = [seq[:seq.index(eos) + 1] if eos in seq else seq for seq in rows]
    assert out.token_ids == expected
    assert out.token_ids[row] == rows[row][:j + 1]
    assert N_NEW in out.stats["new_tokens"]
    assert out.stats["iterations"] == max(len(seq) for seq in expected) - 1
    # stop_on_eos=False ignores the config's eos ids.
    assert decode.generate(stopping, PROMPTS, max_new_tokens=N_NEW, max_len=64, stop_on_eos=False).token_ids == rows


def test_decode_plain_pads_after_stop_and_stops_the_loop_early(target):
    eos = reference_greedy(target, PROMPTS[1], 3)[2]  # row 0 emits it as its third token
    request, shapes = decode.prepare(CONFIG, [PROMPTS[1]], max_new_tokens=N_NEW, sampling=SamplingParams(), max_len=32)
    result = decode.decode_plain(target.params, CONFIG, request, eos_ids=(eos,), **shapes)
    assert result.num_generated_B.tolist() == [3]
    assert result.iterations == 2
    np.testing.assert_array_equal(result.tokens_BxN[0, 3:], decode.PAD_ID)


def test_matches_transformers_greedy(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from specblock_jax.hf import load_hf

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    ours = decode.generate(Target(config, params), PROMPTS[:2], max_new_tokens=N_NEW)
    for prompt, generated in zip(PROMPTS[:2], ours.token_ids):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == generated


def test_top_k_one_equals_greedy(target, batch_greedy):
    out = decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=64, stop_on_eos=False,
                          temperature=1.0, top_k=1, seed=7)
    assert out.token_ids == batch_greedy.token_ids


def test_first_sampled_token_follows_softmax(target):
    """Over many rngs (vmapped, one dispatch), the first token sampled after a right-padded prompt is
    distributed as softmax of the target's logits at the prompt's last position."""
    n, prompt = 8192, PROMPTS[1]
    request, shapes = decode.prepare(CONFIG, [prompt], max_new_tokens=1, sampling=SamplingParams(temperature=1.0),
                                     max_len=8)

    def first_token(rng):
        return decode.decode_plain(target.params, CONFIG, request._replace(rng=rng), eos_ids=(),
                                   **shapes).tokens_BxN[0, 0]

    tokens = jax.jit(jax.vmap(first_token))(jax.random.split(jax.random.key(1), n))
    counts_V = np.bincount(np.asarray(tokens), minlength=CONFIG.vocab_size)
    probs_V = np.asarray(jax.nn.softmax(target.logits([prompt])[0, -1]), np.float64)
    assert 0.5 * np.abs(counts_V / n - probs_V).sum() < 0.05
    small = n * probs_V < 5  # chi-square cells need enough expected mass: pool the small ones
    observed = np.array(counts_V[~small].tolist() + ([counts_V[small].sum()] if small.any() else []))
    expected = np.array((n * probs_V[~small]).tolist() + ([n * probs_V[small].sum()] if small.any() else []))
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < scipy.stats.chi2.ppf(0.999, len(observed) - 1)


class CharTokenizer:
    """Printable ASCII ' '..'_' <-> ids 0..63."""

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [ord(c) - 32 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i + 32) for i in ids)


def test_string_prompts_are_tokenized_and_decoded(target, batch_greedy):
    texts = ["".join(chr(t + 32) for t in p) for p in PROMPTS]
    out = decode.generate(dataclasses.replace(target, tokenizer=CharTokenizer()), texts, max_new_tokens=N_NEW,
                          max_len=64, stop_on_eos=False)
    assert out.token_ids == batch_greedy.token_ids
    assert out.texts == [CharTokenizer().decode(ids) for ids in batch_greedy.token_ids]
    assert out.stats["tokens_per_s"] > 0 and out.stats["prefill_s"] > 0 and out.stats["decode_s"] > 0
    assert decode.generate(target, np.array(PROMPTS[2:3]), max_new_tokens=N_NEW, max_len=64,
                           stop_on_eos=False).token_ids == batch_greedy.token_ids[2:3]


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "prompts is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty (0 tokens)"),
    ([[1, 64]], {}, "prompt 0: token id 64 outside the vocabulary [0, 64)"),
    ([[3], [-1, 2]], {}, "prompt 1: token id -1 outside the vocabulary [0, 64)"),
    ([[3, 1.5]], {}, "prompt 0: token 1.5 is not an integer id"),
    ("hello", {}, "prompts must be a list of strings, of conversations"),
    ([{"role": "user", "content": "hi"}], {}, "got list of messages: wrap one conversation in a list"),
    ([[{"role": "user", "content": "hi"}], "hi"], {}, "prompts mix conversation and string prompts"),
    ([[{"role": "user", "content": "hi"}]], {}, "prompts are text but the target has no tokenizer"),
    (["hi", [1]], {}, "prompts mix ids and string prompts"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    ([[1] * 10], dict(max_len=8), "prompt 0 has 10 tokens, more than max_len 8"),
    ([[1], [1] * 130], {}, "prompt 1 has 130 tokens, more than max_len 128 (the default, capped at "
                           "max_position_embeddings 128)"),
    ([[1]], dict(max_len=256), "max_len 256 exceeds max_position_embeddings 128"),
    ([[1] * 10], dict(max_len=16), "prompt 0 (10 tokens) + max_new_tokens 10 = 20 exceeds max_len 16"),
    ([[1] * 100], dict(max_new_tokens=40), "prompt 0 (100 tokens) + max_new_tokens 40 = 140 exceeds max_len 128"),
    (["hello"], {}, "prompts are text but the target has no tokenizer"),
    ([[1]], dict(temperature=-1.0), "temperature must be a number >= 0"),
    ([[1]], dict(top_p=0.0), "top_p must be a number in (0, 1]"),
])
def test_bad_inputs_fail_before_any_compute(target, monkeypatch, prompts, kwargs, message):
    monkeypatch.setattr(decode, "plain_init", None)  # reaching compilation would raise AttributeError
    with pytest.raises(ValueError, match=re.escape(message)):
        decode.generate(target, prompts, **{"max_new_tokens": 10, **kwargs})


def test_drafter_of_the_wrong_type_is_an_error(target):
    with pytest.raises(ValueError, match="drafter must be a specblock_jax.drafter.Drafter"):
        decode.generate(target, [[1]], max_new_tokens=4, drafter=object())


@pytest.mark.parametrize("drafter", [None, "ngram"])
def test_new_sampling_values_lengths_and_prompts_compile_nothing(target, count_compiles, drafter):
    """Only greedy-or-not and the shapes' buckets are static: a call with another temperature, top-k,
    top-p, max_new_tokens, seed, prompts (same width bucket) and batch size (same bucket) reuses the
    programs of the first, and honours its own settings."""
    decode.generate(target, PROMPTS[:3], max_new_tokens=10, temperature=0.8, seed=1, drafter=drafter)
    with count_compiles() as compiles:
        out = decode.generate(target, PROMPTS[::-1], max_new_tokens=20, temperature=1.3, top_k=7, top_p=0.6, seed=2,
                              drafter=drafter, stop_on_eos=False)
        again = decode.generate(target, PROMPTS[1:], max_new_tokens=5, temperature=0.4, seed=3, drafter=drafter,
                                stop_on_eos=False)
    assert compiles[0] == 0
    assert out.stats["compile_s"] < 1.0
    assert [len(ids) for ids in out.token_ids] == [20] * 4 and [len(ids) for ids in again.token_ids] == [5] * 3
    with count_compiles() as compiles:
        decode.generate(target, PROMPTS[:3], max_new_tokens=10, drafter=drafter)  # greedy: a program of its own
    assert compiles[0] > 0


def test_padding_rows_of_a_bucketed_batch_change_nothing(target, batch_greedy):
    """Three prompts run as a batch of four (one padding row, done from the start): each row's output
    is its output in the unpadded batch of four."""
    out = decode.generate(target, PROMPTS[:3], max_new_tokens=N_NEW, max_len=64, stop_on_eos=False)
    assert out.token_ids == batch_greedy.token_ids[:3]
    assert decode.bucket(3) == 4 and decode.bucket(5, 64) == 64 and decode.bucket(65, 64) == 128
