"""EmbSum on the tiny config: shapes, the offline/online identity, and HF T5 as the reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from embsum.config import ModelConfig
from embsum.losses import summary_loss
from embsum.model import EmbSum, count_parameters
from embsum.scoring import score
from embsum.tokenization import EmbSumTokenizer
from tests.conftest import assert_f32_close

T5_SMALL_PARAMS = 60_506_624  # published: T5ForConditionalGeneration("t5-small"), tied embeddings


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def model(tiny_cfg: ModelConfig, tokenizer: EmbSumTokenizer) -> EmbSum:
    return EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=0).eval()


@pytest.fixture(scope="module")
def batch(tokenizer: EmbSumTokenizer) -> dict[str, torch.Tensor]:
    c = tokenizer.cfg
    g = torch.Generator().manual_seed(0)

    def items(n: int) -> list[list[int]]:
        return [torch.randint(100, 30000, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]

    histories = [items(c.num_sessions * c.items_per_session + 2),  # more than G*P items
                 items(c.items_per_session + 1),  # a partial session and an empty one
                 [],  # no history at all
                 items(1)]
    b, n_cand = len(histories), 3
    sessions = torch.as_tensor(tokenizer.sessions_batch(histories)).long()  # (B, G, L)
    cands = torch.as_tensor(tokenizer.content_batch(items(b * n_cand))).long().view(b, n_cand, -1)  # (B, C, Lc)
    texts = ["likes football and politics", "", "cooking", "a long summary " * 9]
    summaries = torch.as_tensor(np.stack([tokenizer.summary(t) for t in texts])).long()  # (B, S)
    return {"sessions": sessions, "cands": cands, "summaries": summaries, "n_items": [len(h) for h in histories]}


# ---- shapes -----------------------------------------------------------------------------------------
def test_shapes_through_every_public_method(model: EmbSum, batch, tokenizer: EmbSumTokenizer) -> None:
    c = model.cfg
    s, cands, y = batch["sessions"], batch["cands"], batch["summaries"]
    b, g, l_ = s.shape
    n_cand, lc = cands.shape[1:]
    d, v, gp = model.d_model, model.t5.config.vocab_size, c.num_sessions * c.items_per_session
    with torch.no_grad():
        states, mask = model.encode_sessions(s)
        assert states.shape == (b, g, l_, d) and mask.shape == (b, g, l_)
        assert torch.equal(mask, s != tokenizer.pad_id)
        items, item_mask = model.item_states(s, states)
        assert items.shape == (b, gp, d) and item_mask.shape == (b, gp)
        assert item_mask.sum(-1).tolist() == [min(n, gp) for n in batch["n_items"]]
        glob, seq = model.decode_summary(states, mask, y)
        logits = model.summary_logits(seq)
        assert glob.shape == (b, d) and seq.shape == (b, c.summary_tokens, d)
        assert logits.shape == (b, c.summary_tokens, v)
        gen = model.generate_summary_ids(states, mask)
        assert gen.shape == (b, c.summary_tokens) and gen.dtype == torch.long
        enc = model.user_encoding(s, y)
        assert enc.upe.shape == (b, c.user_codes, d) and enc.summary_states.shape == (b, c.summary_tokens, d)
        assert torch.equal(enc.summary_ids, y)
        assert model.encode_user(s, y).shape == (b, c.user_codes, d)
        assert model.encode_user(s).shape == (b, c.user_codes, d)
        texts = model.generate_summary(s, tokenizer)  # EmbSumTokenizer ...
        assert texts == model.generate_summary(s, tokenizer.tok)  # ... or the HF tokenizer
        assert len(texts) == b and all(isinstance(t, str) for t in texts)
        cpe, key = model.encode_content(cands.view(-1, lc))
        assert cpe.shape == key.shape == (b * n_cand, c.content_codes, d)
        out = model(s, cands, y)
        assert out.scores.shape == (b, n_cand) and out.upe.shape == (b, c.user_codes, d)
        assert out.summary_nll is not None and out.summary_nll.shape == ()
        assert model(s, cands).summary_nll is None  # generating mode: no teacher, no summary loss
        for t in (states, items, glob, logits, enc.upe, cpe, key, out.scores):
            assert torch.isfinite(t).all()


def test_generated_ids_are_eos_terminated_and_padded(model: EmbSum, batch) -> None:
    with torch.no_grad():
        gen = model.generate_summary_ids(*model.encode_sessions(batch["sessions"]))
    for row in gen.tolist():
        if model.eos_id in row:
            k = row.index(model.eos_id)
            assert all(t == model.pad_id for t in row[k + 1:])
        assert row[0] != model.eos_id  # at least one token before EOS (min_new_tokens=1)


# ---- the offline/online identity ----------------------------------------------------------------------------
def test_forward_equals_precompute_then_score(model: EmbSum, batch) -> None:
    s, cands, y = batch["sessions"], batch["cands"], batch["summaries"]
    b, n_cand, lc = cands.shape
    with torch.no_grad():
        out = model(s, cands, y)
        upe = model.encode_user(s, y)  # offline: users ...
        cpe, key = model.encode_content(cands.reshape(b * n_cand, lc))  # ... and items, separately
        per_user = score(upe, cpe.view(b, n_cand, *cpe.shape[1:]), key.view(b, n_cand, *key.shape[1:]))
        all_pairs = score(upe, cpe, key)  # (B, B*C): each user against the whole "catalog"
    assert_f32_close(out.scores, per_user)
    diag = torch.stack([all_pairs[i, i * n_cand:(i + 1) * n_cand] for i in range(b)])
    assert_f32_close(out.scores, diag)
    torch.testing.assert_close(out.upe, upe, atol=1e-6, rtol=1e-6)


def test_generating_mode_equals_teacher_forced_on_its_summary(model: EmbSum, batch) -> None:
    s = batch["sessions"]
    with torch.no_grad():
        gen = model.user_encoding(s)
        tf = model.user_encoding(s, gen.summary_ids)
    torch.testing.assert_close(gen.upe, tf.upe, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(gen.upe, model.encode_user(s, batch["summaries"]), atol=1e-4)  # the summary matters


def test_generation_is_greedy_on_the_teacher_forced_logits(model: EmbSum, batch) -> None:
    with torch.no_grad():
        states, mask = model.encode_sessions(batch["sessions"])
        gen = model.generate_summary_ids(states, mask)
        logits = model.summary_logits(model.decode_summary(states, mask, gen)[1])  # causal: step t sees gen[:t] only
    n = model.cfg.summary_no_repeat_ngram
    assert n == 3  # the default guard is on in this test
    for r, row in enumerate(gen.tolist()):
        for t, tok in enumerate(row):
            lt = logits[r, t].clone()
            if t == 0:
                lt[model.eos_id] = -float("inf")  # min_new_tokens=1 forbids EOS first
            # no_repeat_ngram_size=n: a token that would repeat an n-gram already generated is banned.
            # The decoder's input at step t is [start, row[:t]]; the start token counts as generated.
            seen = [model.pad_id, *row[:t]]
            for j in range(len(seen) - n + 1):
                if n > 1 and seen[j:j + n - 1] == seen[len(seen) - n + 1:]:
                    lt[seen[j + n - 1]] = -float("inf")
            assert lt[tok] >= lt.max() - 1e-4, (r, t, tok, int(lt.argmax()))
            if tok == model.eos_id:
                break
        text = [x for x in row if x != model.pad_id]
        grams = [tuple(text[i:i + n]) for i in range(len(text) - n + 1)]
        assert len(grams) == len(set(grams)), "a trigram repeats"


def test_decode_summary_matches_hf_t5(model: EmbSum, batch) -> None:
    y = batch["summaries"]
    with torch.no_grad():
        states, mask = model.encode_sessions(batch["sessions"])
        glob, seq = model.decode_summary(states, mask, y)
        logits = model.summary_logits(seq)
        nll = model.summary_nll(seq, y)
        b = y.shape[0]
        enc = states.reshape(b, -1, states.shape[-1])
        ref = model.t5(encoder_outputs=(enc,), attention_mask=mask.reshape(b, -1).long(), labels=y,
                       output_hidden_states=True)
    assert_f32_close(logits, ref.logits)
    assert_f32_close(nll, summary_loss(ref.logits, y, model.pad_id))  # the fused head + loss, on HF's logits
    hidden = ref.decoder_hidden_states[-1]  # (B, S, D), after the final layer norm
    for i, row in enumerate(y.tolist()):
        eos_at = row.index(model.eos_id)  # every teacher summary here has an EOS
        assert_f32_close(glob[i], hidden[i, eos_at])


def test_session_encoding_equals_hf_encoder_per_session(model: EmbSum, batch, tokenizer: EmbSumTokenizer) -> None:
    s = batch["sessions"]
    with torch.no_grad():
        states, mask = model.encode_sessions(s)
        items, item_mask = model.item_states(s, states)
        enc = model.t5.get_encoder()
        p = model.cfg.items_per_session
        for u in range(s.shape[0]):
            for g in range(s.shape[1]):
                ids = s[u, g][s[u, g] != tokenizer.pad_id]  # unpadded session
                if len(ids) == 0:
                    assert (states[u, g] == 0).all() and not item_mask[u, g * p:(g + 1) * p].any()
                    continue
                ref = enc(input_ids=ids[None]).last_hidden_state[0]  # (len, D)
                assert_f32_close(states[u, g, : len(ids)], ref)
                sos_pos = [i for i, t in enumerate(ids.tolist()) if t == tokenizer.sos_id]
                for k, pos in enumerate(sos_pos):
                    assert item_mask[u, g * p + k]
                    assert_f32_close(items[u, g * p + k], ref[pos])
                assert not item_mask[u, g * p + len(sos_pos):(g + 1) * p].any()


def test_skipping_empty_sessions_changes_nothing(model: EmbSum, batch, monkeypatch) -> None:
    """Encode every session, empty ones included, and the users with a history get the same UPE."""
    s, y = batch["sessions"], batch["summaries"]
    with torch.no_grad():
        skipped = model.encode_user(s, y)
        b, g, l_ = s.shape
        flat = s.reshape(b * g, l_)
        m = flat != model.pad_id
        m_all = m.clone()
        m_all[~m.any(-1), 0] = True  # let the encoder see something in the empty sessions: garbage states
        everything = model.t5.get_encoder()(input_ids=flat, attention_mask=m_all.long()).last_hidden_state
        monkeypatch.setattr(model, "encode_sessions",
                            lambda ids: (everything.view(b, g, l_, -1), m.view(b, g, l_)))
        no_skip = model.encode_user(s, y)
    has_history = [i for i, n in enumerate(batch["n_items"]) if n > 0]
    assert_f32_close(no_skip[has_history], skipped[has_history])


@pytest.mark.parametrize("generate", [False, True])
def test_results_do_not_depend_on_the_batch(model: EmbSum, batch, generate: bool) -> None:
    s, y = batch["sessions"], batch["summaries"]
    with torch.no_grad():
        together = model.encode_user(s, None if generate else y)
        for i in range(s.shape[0]):  # alone, including the user with no history (then no session runs)
            alone = model.encode_user(s[i:i + 1], None if generate else y[i:i + 1])
            assert_f32_close(alone[0], together[i])


def test_encode_content_matches_unpadded_encoder_and_gate(model: EmbSum, batch) -> None:
    cands = batch["cands"].reshape(-1, batch["cands"].shape[-1])
    with torch.no_grad():
        cpe, key = model.encode_content(cands)
        assert_f32_close(key, F.gelu(cpe @ model.item_gate.weight.T))
        for i in range(cands.shape[0]):
            ids = cands[i][cands[i] != model.pad_id]
            states = model.t5.get_encoder()(input_ids=ids[None]).last_hidden_state  # (1, len, D)
            ref = model.content_poly(states, torch.ones(1, len(ids), dtype=torch.bool))
            assert_f32_close(cpe[i], ref[0])


def test_eval_is_deterministic_and_dropout_is_live_in_train(tiny_cfg: ModelConfig, batch,
                                                            tokenizer: EmbSumTokenizer) -> None:
    m = EmbSum.from_config(dataclasses.replace(tiny_cfg, dropout=0.3), tokenizer.sos_id, seed=1)
    args = (batch["sessions"][:2], batch["cands"][:2], batch["summaries"][:2])
    with torch.no_grad():
        m.eval()
        a, b = m(*args).scores, m(*args).scores
        assert torch.equal(a, b)
        assert torch.equal(m.encode_user(args[0]), m.encode_user(args[0]))
        m.train()
        assert not torch.equal(m(*args).scores, m(*args).scores)  # the check above could fail


def test_seed_makes_init_reproducible(tiny_cfg: ModelConfig, tokenizer: EmbSumTokenizer) -> None:
    a = EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=7)
    b = EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=7)
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_bad_sos_id_and_unloadable_backbone(tiny_cfg: ModelConfig, tmp_path) -> None:
    with pytest.raises(ValueError, match="SOS"):
        EmbSum.from_config(tiny_cfg, sos_id=tiny_cfg.vocab_size + 5)
    cfg = dataclasses.replace(tiny_cfg, random_init=False, backbone=str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="random_init"):
        EmbSum.from_config(cfg, sos_id=32099)


# ---- t5-small shape ------------------------------------------------------------------------------------------
def _t5_param_formula(c: ModelConfig) -> int:
    """T5 (relu FFN, tied embeddings, no biases) counted from its architecture."""
    d, inner = c.d_model, c.num_heads * c.d_kv
    attn = 4 * d * inner
    ffn = 2 * d * c.d_ff
    rel_bias = 32 * c.num_heads  # relative_attention_num_buckets x heads, first layer of each stack
    enc = c.num_layers * (attn + ffn + 2 * d) + rel_bias + d
    dec = c.num_decoder_layers * (2 * attn + ffn + 3 * d) + rel_bias + d
    return c.vocab_size * d + enc + dec


def test_t5_small_shaped_parameter_count(capsys) -> None:
    cfg = ModelConfig(random_init=True)  # the defaults are t5-small's shape
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = EmbSum.from_config(cfg, sos_id=32099)
    backbone = count_parameters(m.t5)
    heads = count_parameters(m) - backbone
    assert _t5_param_formula(cfg) == T5_SMALL_PARAMS
    assert backbone == T5_SMALL_PARAMS
    d = cfg.d_model
    assert heads == 3 * d * d + (cfg.user_codes + cfg.content_codes) * d  # W_f x2, W_s, codes
    assert count_parameters(m) == T5_SMALL_PARAMS + heads
    with capsys.disabled():
        print(f"\n[t5-small-shaped EmbSum] backbone {backbone:,} + heads {heads:,} = total {backbone + heads:,}")


def test_beam_summaries_are_padded_unrepeated_and_read_back_as_generated(tiny_cfg: ModelConfig,
                                                                           tokenizer: EmbSumTokenizer, batch) -> None:
    cfg = dataclasses.replace(tiny_cfg, summary_num_beams=4, summary_no_repeat_ngram=2)
    beam = EmbSum.from_config(cfg, tokenizer.sos_id, seed=0).eval()
    with torch.no_grad():
        states, mask = beam.encode_sessions(batch["sessions"])
        gen = beam.generate_summary_ids(states, mask)  # (B, S)
        enc = beam.user_encoding(batch["sessions"])
        tf = beam.user_encoding(batch["sessions"], enc.summary_ids)
    assert gen.shape == (batch["sessions"].shape[0], cfg.summary_tokens)
    torch.testing.assert_close(enc.summary_ids, gen)  # deterministic: the same beam search both times
    torch.testing.assert_close(enc.upe, tf.upe, atol=1e-6, rtol=1e-6)  # the UPE reads the beam's summary
    for row in gen.tolist():
        text = row[:row.index(beam.eos_id)] if beam.eos_id in row else [x for x in row if x != beam.pad_id]
        assert beam.pad_id not in text  # padding only after EOS
        grams = list(zip(text, text[1:], strict=False))
        assert len(grams) == len(set(grams)), "a bigram repeats"


def test_random_init_takes_the_tokenizers_special_ids(tiny_cfg, tokenizer) -> None:
    m = EmbSum.from_config(tiny_cfg, tokenizer.sos_id, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, seed=0)
    assert (m.pad_id, m.eos_id) == (tokenizer.pad_id, tokenizer.eos_id)
    other = EmbSum.from_config(tiny_cfg, tokenizer.sos_id, pad_id=0, eos_id=2, seed=0)
    assert other.eos_id == 2 and other.t5.config.eos_token_id == 2  # not a hard-coded 1
