"""Samplers (greedy, temperature, top-k, top-p) and KV-cache generation against transformers and a full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxalign.config import MeshConfig
from jaxalign.data.packing import prompt_batch
from jaxalign.errors import JaxalignError
from jaxalign.models.llama import LlamaConfig, LlamaForCausalLM, logical_axes
from jaxalign.objectives.logprobs import token_log_probs
from jaxalign.sampling import SamplingParams, decode, generate, process_logits, sample_logits
from jaxalign.sharding import global_batch, logical_rules, logical_shardings, make_mesh

DRAWS = 20000


def _logits(vocab=50, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(vocab,)) * 2.0, jnp.float32)


def _draw(logits, params, seed=0, draws=DRAWS):
    batch = jnp.broadcast_to(logits, (draws, logits.shape[-1]))
    return np.asarray(jax.jit(sample_logits, static_argnums=2)(jax.random.key(seed), batch, params))


def _nucleus(logits, temperature, top_p):
    """Reference top-p set in numpy: the most likely tokens until their mass reaches top_p."""
    probs = np.exp(logits / temperature - np.max(logits / temperature))
    probs /= probs.sum()
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    return set(order[mass_before < top_p].tolist())


def test_greedy_is_argmax_and_ignores_rng():
    logits = jnp.stack([_logits(seed=s) for s in range(4)])
    greedy = SamplingParams(temperature=0.0)
    tokens = sample_logits(jax.random.key(1), logits, greedy)
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(tokens, sample_logits(jax.random.key(2), logits, greedy))


def test_fixed_rng_reproduces_and_different_rng_differs():
    logits = _logits()
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    first = _draw(logits, params, seed=3, draws=256)
    np.testing.assert_array_equal(first, _draw(logits, params, seed=3, draws=256))
    assert not np.array_equal(first, _draw(logits, params, seed=4, draws=256))


def test_top_k_never_leaves_the_k_most_likely_and_covers_them_in_proportion():
    logits = _logits()
    params = SamplingParams(temperature=0.7, top_k=5)
    tokens = _draw(logits, params)
    allowed = np.argsort(-np.asarray(logits))[:5]
    assert set(np.unique(tokens)) <= set(allowed.tolist())
    tempered = np.asarray(logits)[allowed] / 0.7
    expected = np.exp(tempered - tempered.max())
    expected /= expected.sum()
    observed = np.array([(tokens == t).mean() for t in allowed])
    np.testing.assert_allclose(observed, expected, atol=4 * np.sqrt(0.25 / DRAWS))


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    logits = jnp.zeros((10,), jnp.float32)
    tokens = _draw(logits, SamplingParams(top_k=3))
    assert len(np.unique(tokens)) == 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.5), (1.0, 0.9), (0.5, 0.8), (1.5, 0.3)])
def test_top_p_never_leaves_the_nucleus(temperature, top_p):
    logits = _logits(seed=5)
    tokens = _draw(logits, SamplingParams(temperature=temperature, top_p=top_p))
    nucleus = _nucleus(np.asarray(logits), temperature, top_p)
    assert set(np.unique(tokens).tolist()) <= nucleus
    assert len(np.unique(tokens)) == len(nucleus)


def test_top_k_then_top_p_applies_both_limits():
    logits = _logits(seed=6)
    params = SamplingParams(temperature=1.0, top_k=8, top_p=0.6)
    tokens = _draw(logits, params)
    top8 = np.argsort(-np.asarray(logits))[:8]
    restricted = np.full_like(np.asarray(logits), -np.inf)
    restricted[top8] = np.asarray(logits)[top8]
    assert set(np.unique(tokens).tolist()) <= _nucleus(restricted, 1.0, 0.6)


def test_sample_frequencies_follow_process_logits():
    logits = _logits(seed=7, vocab=20)
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.95)
    tokens = _draw(logits, params)
    probs = np.asarray(jax.nn.softmax(process_logits(logits, params)))
    observed = np.bincount(tokens, minlength=20) / DRAWS
    np.testing.assert_allclose(observed, probs, atol=4 * np.sqrt(0.25 / DRAWS))
    assert np.all(observed[probs == 0] == 0)


def test_process_logits_greedy_keeps_only_argmax():
    logits = _logits()
    processed = np.asarray(process_logits(logits, SamplingParams(temperature=0.0)))
    assert np.isfinite(processed).sum() == 1
    assert np.argmax(processed) == np.argmax(np.asarray(logits))


def test_logprobs_are_reported_at_the_sampling_temperature_or_1_when_greedy():
    assert SamplingParams(temperature=0.7, top_k=5).logprob_temperature == 0.7
    assert SamplingParams(temperature=0.0).logprob_temperature == 1.0


@pytest.mark.parametrize(
    "kwargs,key", [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p")]
)
def test_bad_sampling_params_name_the_setting(kwargs, key):
    with pytest.raises(JaxalignError, match=key):
        SamplingParams(**kwargs)


# --- generation with the KV cache ------------------------------------------------------------------------------

PROMPTS = [[1, 5, 9, 33], [1, 7], [1, 100, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
NEW = 8
SAMPLED = SamplingParams(temperature=0.7, top_k=20)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model with a scaled-up LM head, so that its next-token distributions are far from uniform."""
    config = LlamaConfig.tiny()
    model = LlamaForCausalLM(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * 10}
    return model, params


def _full_forward(model, params, prompts, completions, temperature=1.0):
    """Per row: log-probs at `temperature` of the completion tokens and argmax tokens, from one forward pass over
    prompt + completion (right-padded to one length, which causal attention ignores) through the log-prob helper."""
    sequences = [p + c for p, c in zip(prompts, completions)]
    width = max(len(seq) for seq in sequences)
    ids = np.zeros((len(sequences), width + 1), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
    logits = jax.jit(model.apply)({"params": params}, ids[:, :-1])
    logprobs = np.asarray(token_log_probs(logits, ids[:, 1:], temperature))
    logits = np.asarray(logits)
    results = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        steps = len(prompt) - 1 + np.arange(len(completion))
        results.append((logprobs[row, steps], np.argmax(logits[row, steps], axis=-1)))
    return results


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), SAMPLED])
def test_logprobs_equal_a_full_forward_over_the_generated_sequence(tiny, sampling):
    model, params = tiny
    out = generate(model, params, PROMPTS, NEW, rng=jax.random.key(3), sampling=sampling)
    assert out.tokens.shape == (3, NEW) and out.logprobs.shape == (3, NEW)
    reference = _full_forward(model, params, PROMPTS, out.completions(), sampling.logprob_temperature)
    for completion, logprobs, (expected, argmax) in zip(out.completions(), out.completion_logprobs(), reference):
        assert len(completion) > 0
        np.testing.assert_allclose(logprobs, expected, atol=1e-5, rtol=0)
        if sampling.greedy:
            np.testing.assert_array_equal(completion, argmax)


def test_each_row_completes_as_if_alone(tiny):
    model, params = tiny
    together = generate(model, params, PROMPTS, NEW).completions()
    for prompt, completion in zip(PROMPTS, together):
        assert generate(model, params, [prompt], NEW).completions()[0] == completion


def test_fixed_rng_reproduces_generation(tiny):
    model, params = tiny
    first = generate(model, params, PROMPTS, NEW, rng=jax.random.key(7), sampling=SAMPLED)
    again = generate(model, params, PROMPTS, NEW, rng=jax.random.key(7), sampling=SAMPLED)
    other = generate(model, params, PROMPTS, NEW, rng=jax.random.key(8), sampling=SAMPLED)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    assert not np.array_equal(first.tokens, other.tokens)


class CompileCounter:
    """Counts XLA compilations (backend compile events) while active."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_calls_in_the_same_bucket_do_not_recompile(tiny):
    model, params = tiny
    sampling = SAMPLED
    generate(model, params, PROMPTS, NEW, rng=jax.random.key(0), sampling=sampling)
    other_prompts = [[1, 2, 3], [4] * 16, [9, 8], [7, 7, 7, 7, 7]]
    with CompileCounter() as later:
        generate(model, params, other_prompts, NEW, rng=jax.random.key(1), sampling=sampling)
        generate(model, params, PROMPTS + [[3]], NEW, rng=jax.random.key(2), sampling=sampling, min_new_tokens=3,
                 stop_token_ids=(5,), pad_id=4)
    assert later.count == 0
    with CompileCounter() as new_bucket:
        generate(model, params, [[1] * 17], NEW, rng=jax.random.key(0), sampling=sampling)
    assert new_bucket.count >= 1


def test_rows_stop_on_stop_tokens_but_not_before_min_new_tokens(tiny):
    model, params = tiny
    free = generate(model, params, PROMPTS, NEW, stop_token_ids=(-1,))
    assert list(free.lengths) == [NEW] * 3
    stop = int(free.tokens[0, 2])
    first_stop = list(free.tokens[0]).index(stop)
    stopped = generate(model, params, PROMPTS, NEW, stop_token_ids=(stop,), pad_id=0)
    assert stopped.lengths[0] == first_stop + 1
    assert stopped.completions()[0] == free.completions()[0][: first_stop + 1]
    assert np.all(stopped.tokens[0, first_stop + 1 :] == 0) and np.all(stopped.logprobs[0, first_stop + 1 :] == 0)
    late = generate(model, params, PROMPTS, NEW, stop_token_ids=(stop,), min_new_tokens=first_stop + 2)
    assert stop not in late.completions()[0][: first_stop + 2]


def test_streaming_callback_sees_every_token_in_order(tiny):
    model, params = tiny
    seen = []
    out = generate(model, params, PROMPTS, NEW, stop_token_ids=(-1,), on_tokens=lambda t, a: seen.append((t, a)))
    assert len(seen) == NEW
    streamed = np.stack([tokens for tokens, _ in seen], axis=1)[:3]
    np.testing.assert_array_equal(streamed, out.tokens)
    assert all(list(active) == [True, True, True, False] for _, active in seen)


def test_sharded_params_on_a_mesh_give_the_same_completions(tiny):
    from jaxalign.models.llama import logical_axes
    from jaxalign.sharding import DEFAULT_RULES

    model, params = tiny
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = tuple(DEFAULT_RULES.items())
    shardings = nn.logical_to_mesh_sharding(logical_axes(model), mesh, rules)
    sharded = jax.device_put(params, shardings)
    expected = generate(model, params, PROMPTS, NEW)
    out = generate(model, sharded, PROMPTS, NEW, mesh=mesh, rules=[list(rule) for rule in rules])
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=1e-5)
    with pytest.raises(JaxalignError, match="on_tokens runs on a single device"):
        generate(model, sharded, PROMPTS, NEW, mesh=mesh, rules=rules, on_tokens=print)


def test_decode_inside_a_jitted_step_on_a_mesh_matches_single_device_generate(tiny):
    """A rollout as an RL step runs it: decode traced in the user's jit under the training mesh and rules, params
    fsdp- and tensor-sharded, the batch sharded over data x fsdp; stop ids and active rows are runtime inputs."""
    model, params = tiny
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = logical_rules(MeshConfig())
    sharded = jax.device_put(params, logical_shardings(logical_axes(model), mesh, rules))
    host_batch = prompt_batch(PROMPTS + [None], 16, pad_id=0)
    rng = jax.random.key(11)

    @jax.jit
    def rollout(params, batch, stop_token_ids, rng):
        return decode(
            model, params, batch["input_ids"], batch["segment_ids"], batch["positions"], rng, max_new_tokens=NEW,
            sampling=SAMPLED, stop_token_ids=stop_token_ids, pad_id=0, active=batch["prompt_mask"] > 0,
        )

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = global_batch(host_batch, mesh, rules)
        assert not batch["input_ids"].sharding.is_fully_replicated
        tokens, logprobs, lengths = rollout(sharded, batch, jnp.array([-1]), rng)
    expected = generate(model, params, PROMPTS, NEW, rng=rng, sampling=SAMPLED, stop_token_ids=(-1,), pad_id=0)
    np.testing.assert_array_equal(tokens[:3], expected.tokens)
    np.testing.assert_allclose(logprobs[:3], expected.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(lengths, [NEW, NEW, NEW, 0])

    stop = int(tokens[0, 2])
    first_stop = list(np.asarray(tokens[0])).index(stop)
    host_batch["prompt_mask"][2] = 0
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        stopped = rollout(sharded, global_batch(host_batch, mesh, rules), jnp.array([stop]), rng)
    tokens, logprobs, lengths = (np.asarray(x) for x in stopped)
    assert lengths[0] == first_stop + 1 and lengths[2] == 0
    np.testing.assert_array_equal(tokens[0, : first_stop + 1], expected.tokens[0, : first_stop + 1])
    assert np.all(tokens[0, first_stop + 1 :] == 0) and np.all(logprobs[0, first_stop + 1 :] == 0)
    assert np.all(tokens[2] == 0) and np.all(logprobs[2] == 0)


@pytest.mark.parametrize(
    "shapes,kwargs,message",
    [
        (((2, 4), (2, 4), (2, 5)), {}, r"one shape \[B, P\].*positions \(2, 5\)"),
        (((4,), (4,), (4,)), {}, r"one shape \[B, P\]"),
        (((2, 4),) * 3, {"active": jnp.ones((3,), bool)}, r"active must have shape \[B\] = \(2,\)"),
        (((2, 4),) * 3, {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        (((2, 4),) * 3, {"min_new_tokens": NEW + 1}, "min_new_tokens"),
    ],
)
def test_decode_rejects_bad_prompt_arrays_and_settings(tiny, shapes, kwargs, message):
    model, params = tiny
    arrays = [jnp.ones(shape, jnp.int32) for shape in shapes]
    settings = {"max_new_tokens": NEW, "sampling": SAMPLED, "stop_token_ids": jnp.array([2]), "pad_id": 0, **kwargs}
    with pytest.raises(JaxalignError, match=message):
        decode(model, params, *arrays, jax.random.key(0), **settings)


def test_too_long_prompts_fail_clearly_or_are_truncated(tiny):
    model, params = tiny
    context = model.config.max_position_embeddings
    long_prompt = list(range(3, 3 + context - 4))
    with pytest.raises(JaxalignError, match=rf"prompt 1 has {context - 4} tokens.*at most {context - NEW}"):
        generate(model, params, [[1, 2], long_prompt], NEW)
    out = generate(model, params, [[1, 2], long_prompt], NEW, truncate_prompts=True)
    expected = generate(model, params, [[1, 2], long_prompt[-(context - NEW) :]], NEW)
    assert out.completions() == expected.completions()


@pytest.mark.parametrize(
    "prompts,kwargs,message",
    [
        ([], {}, "no prompts"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 999]], {}, "token id 999 is outside the vocabulary"),
        ([[1]], {"min_new_tokens": NEW + 1}, "min_new_tokens"),
        ([[1]], {"sampling": SamplingParams(temperature=1.0)}, "explicit rng"),
    ],
)
def test_bad_generation_input_is_reported(tiny, prompts, kwargs, message):
    model, params = tiny
    with pytest.raises(JaxalignError, match=message):
        generate(model, params, prompts, NEW, **kwargs)


# --- parity with transformers greedy generation ----------------------------------------------------------------


def _transformers_greedy(hf_model, prompts, max_new_tokens, pad_id, eos_id):
    """transformers `generate(do_sample=False)` on the left-padded batch; per row the new tokens up to its EOS."""
    torch = pytest.importorskip("torch")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            pad_token_id=pad_id, eos_token_id=eos_id, temperature=None, top_p=None, top_k=None,
        )
    completions = []
    for row in out[:, width:].tolist():
        completions.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return completions


def test_greedy_matches_transformers_on_a_tiny_random_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jaxalign

    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.15)
    hf_model.save_pretrained(tmp_path)
    model, params = jaxalign.load_pretrained(tmp_path)
    prompts = [[1, 17, 33, 9, 100, 4, 60], [1, 5], [1, 90, 91, 92, 93], [1, 70, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 8]]
    unstopped = _transformers_greedy(hf_model, prompts, 24, pad_id=0, eos_id=2)
    assert generate(model, params, prompts, 24, stop_token_ids=(2,), pad_id=0).completions() == unstopped
    eos = unstopped[1][5]
    expected = _transformers_greedy(hf_model, prompts, 24, pad_id=0, eos_id=eos)
    assert len(expected[1]) <= 6
    assert generate(model, params, prompts, 24, stop_token_ids=(eos,), pad_id=0).completions() == expected


@pytest.mark.slow
def test_greedy_matches_transformers_on_smollm2_and_logprobs_match_a_full_forward(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jaxalign
    from jaxalign.hf import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    questions = ["What is the capital of France?", "Hi", "Write a haiku about the sea, the wind and a lonely gull."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    expected = _transformers_greedy(hf_model, prompts, 20, pad_id=tokenizer.pad_token_id or eos, eos_id=eos)
    model, params = jaxalign.load_pretrained(smollm2_dir)
    out = generate(model, params, prompts, 20, stop_token_ids=(eos,))
    assert out.completions() == expected
    # In float32 on CPU, SmolLM2's own full forward moves a logprob by up to ~2.5e-5 between batch layouts (one row
    # alone vs three right-padded rows), so the cached decode is held to that floor here; the tiny model meets 1e-5.
    reference = _full_forward(model, params, prompts, out.completions())
    for logprobs, (expected_logprobs, _) in zip(out.completion_logprobs(), reference):
        np.testing.assert_allclose(logprobs, expected_logprobs, atol=5e-5, rtol=0)
