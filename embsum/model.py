"""EmbSum (DESIGN.md 2): a Hugging Face T5 wrapped with poly-attention user and item embeddings.

Read top to bottom: session encoding -> summary decoding -> UPE; candidate encoding -> CPE;
``forward`` = ``score(encode_user(...), encode_content(...))``. Notation: B users, G sessions,
P items per session, L session tokens, Lc candidate tokens, S summary tokens, C candidates,
D d_model, M user codes, N content codes, V vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from embsum.config import ModelConfig
from embsum.linear_cross_entropy import IGNORE, linear_cross_entropy
from embsum.losses import summary_loss
from embsum.poly_attention import PolyAttention
from embsum.scoring import score


@dataclass
class EmbSumOutput:
    scores: torch.Tensor  # (B, C); candidate 0 is the positive in training batches
    summary_nll: torch.Tensor | None  # () teacher-forced summary's mean token NLL; None when generated
    upe: torch.Tensor  # (B, M, D)
    cpe: torch.Tensor  # (B, C, N, D) the candidates' content poly-embeddings
    cpe_key: torch.Tensor  # (B, C, N, D) gelu(B W_s): with cpe, what in-batch negatives are scored with


@dataclass
class UserEncoding:
    upe: torch.Tensor  # (B, M, D)
    summary_ids: torch.Tensor  # (B, S) the summary the global vector was read from
    summary_states: torch.Tensor  # (B, S, D) the LM head's inputs (``summary_logits`` makes the logits)


def t5_config(cfg: ModelConfig, pad_id: int, eos_id: int) -> T5Config:
    """The backbone config for ``random_init`` (t5-small's shape by default), with the tokenizer's ids."""
    return T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
        dropout_rate=cfg.dropout, pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id,
        feed_forward_proj="relu", tie_word_embeddings=True,
    )  # type: ignore[call-arg]  # both reach PretrainedConfig through **kwargs; T5Config's signature omits them


T5_PAD_ID, T5_EOS_ID = 0, 1  # the T5 SentencePiece vocabulary's <pad> and </s>


class EmbSum(nn.Module):
    def __init__(self, cfg: ModelConfig, t5: T5ForConditionalGeneration, sos_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.t5 = t5
        self.sos_id = int(sos_id)
        self.pad_id = int(t5.config.pad_token_id)  # type: ignore[arg-type]  # every T5 config sets both ids
        self.eos_id = int(t5.config.eos_token_id)  # type: ignore[arg-type]
        if self.sos_id >= t5.config.vocab_size:
            raise ValueError(f"[SOS] id {self.sos_id} is outside the backbone's vocabulary ({t5.config.vocab_size})")
        d = t5.config.d_model
        self.user_poly = PolyAttention(d, cfg.user_codes)  # M codes, W_f for users
        self.content_poly = PolyAttention(d, cfg.content_codes)  # N codes, W_f for items
        self.item_gate = nn.Linear(d, d, bias=False)  # W_s
        # Set by the trainer under ZeRO-3 with several ranks: generate() must keep every rank
        # stepping until all are done, because each forward gathers sharded parameters collectively.
        self.synced_generation = False

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig, sos_id: int, *, pad_id: int = T5_PAD_ID, eos_id: int = T5_EOS_ID,
                    seed: int | None = None) -> EmbSum:
        """Pretrained backbone via ``from_pretrained(cfg.backbone)``, or random init from cfg's shape
        with ``pad_id`` / ``eos_id`` (T5's SentencePiece ids unless the tokenizer says otherwise)."""
        if seed is not None:
            torch.manual_seed(seed)
        if cfg.random_init:
            t5 = T5ForConditionalGeneration(t5_config(cfg, pad_id, eos_id))
        else:
            try:
                t5 = T5ForConditionalGeneration.from_pretrained(cfg.backbone, dropout_rate=cfg.dropout)
            except OSError as e:
                raise ValueError(f"model.backbone={cfg.backbone!r} could not be loaded (no network or no such "
                                 f"path?); set model.random_init=true to build it from the shape fields: {e}") from None
        return cls(cfg, t5, sos_id)

    @property
    def d_model(self) -> int:
        return int(self.t5.config.d_model)

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint needs besides the weights to rebuild this module without a download."""
        return {"embsum": asdict(self.cfg), "t5": self.t5.config.to_dict(), "sos_id": self.sos_id}

    # ---- 1. session encoding ----------------------------------------------------------------------
    def encode_sessions(self, session_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """session_ids (B, G, L) -> token states (B, G, L, D), token mask (B, G, L).

        All sessions of all users go through the encoder as one batch; sessions that are pure
        padding are skipped (their states stay 0 and are masked everywhere downstream).
        """
        b, g, seq = session_ids.shape
        flat = session_ids.reshape(b * g, seq)  # (B*G, L)
        mask = flat != self.pad_id  # (B*G, L)
        live = mask.any(-1)  # (B*G,)
        forced = not bool(live.any())
        if forced:
            live = live.clone()
            live[0] = True  # the encoder runs on every rank every step (ZeRO-3 gathers are collective)
        out = self.t5.get_encoder()(input_ids=flat[live], attention_mask=mask[live].long()).last_hidden_state
        if forced:
            # The forced session is padding: its states must be 0 like every skipped session's, or a
            # user with no history would get a different UPE alone than in a batch (the decoder's
            # fully masked cross-attention averages whatever the states hold). * 0 keeps the graph.
            out = out * 0.0
        states = out.new_zeros(b * g, seq, out.shape[-1])  # (B*G, L, D)
        states[live] = out
        return states.view(b, g, seq, -1), mask.view(b, g, seq)

    def item_states(self, session_ids: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each item's vector is the encoder state at its [SOS]: -> (B, G*P, D), mask (B, G*P)."""
        b, g, _, d = states.shape
        p = self.cfg.items_per_session
        is_sos = session_ids == self.sos_id  # (B, G, L)
        # Stable argsort puts marker positions first, in order: a fixed-shape gather of P slots.
        pos = torch.argsort((~is_sos).to(torch.int8), dim=-1, stable=True)[..., :p]  # (B, G, P)
        valid = is_sos.sum(-1, keepdim=True) > torch.arange(p, device=states.device)  # (B, G, P)
        items = torch.gather(states, 2, pos.unsqueeze(-1).expand(b, g, p, d))  # (B, G, P, D)
        return items.reshape(b, g * p, d), valid.reshape(b, g * p)

    # ---- 2. summary decoding -------------------------------------------------------------------------
    def decode_summary(self, states: torch.Tensor, mask: torch.Tensor,
                       summary_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder over all sessions' states -> global vector (B, D) and the LM head's
        inputs (B, S, D). The logits themselves (B, S, V) are made only where needed: ``summary_logits``,
        or fused into the training loss (``summary_nll``); the user embedding needs neither."""
        b = states.shape[0]
        enc = states.reshape(b, -1, states.shape[-1])  # (B, G*L, D)
        enc_mask = mask.reshape(b, -1)  # (B, G*L)
        dec_in = F.pad(summary_ids[:, :-1], (1, 0), value=self.pad_id)  # (B, S) shift right, pad = start
        hidden = self.t5.get_decoder()(
            input_ids=dec_in, encoder_hidden_states=enc, encoder_attention_mask=enc_mask.long(),
        ).last_hidden_state  # (B, S, D)
        seq = hidden * self.d_model**-0.5 if getattr(self.t5.config, "scale_decoder_outputs",
                                                     self.t5.config.tie_word_embeddings) else hidden
        eos_at = self._eos_index(summary_ids)  # (B,)
        glob = hidden[torch.arange(b, device=hidden.device), eos_at]  # (B, D) the state that emits EOS
        return glob, seq

    def summary_logits(self, seq: torch.Tensor) -> torch.Tensor:
        """The LM head's inputs (B, S, D) -> logits (B, S, V)."""
        logits: torch.Tensor = self.t5.lm_head(seq)  # (B, S, V)
        return logits

    def summary_nll(self, seq: torch.Tensor, summary_ids: torch.Tensor) -> torch.Tensor:
        """Mean token NLL of the teacher summary (B, S) under the logits of ``seq`` (B, S, D), padding
        ignored (0 if all padding): the LM head and the cross-entropy fused a chunk at a time, so the
        (B, S, V) logits never exist at once. Under ZeRO-3 the head's weight is gathered only inside
        the head's own forward, so there the logits are made by it."""
        labels = summary_ids.long().masked_fill(summary_ids == self.pad_id, IGNORE)  # (B, S)
        weight = self.t5.lm_head.weight  # (V, D)
        if hasattr(weight, "ds_id"):  # a ZeRO-3 partitioned parameter
            return summary_loss(self.summary_logits(seq), summary_ids, self.pad_id)
        return linear_cross_entropy(seq.reshape(-1, seq.shape[-1]), weight, labels.reshape(-1))  # ()

    def _eos_index(self, summary_ids: torch.Tensor) -> torch.Tensor:
        """First EOS per row; if none (generation hit the bound), the last non-pad token; else 0."""
        s = summary_ids.shape[1]
        ar = torch.arange(s, device=summary_ids.device)  # (S,)
        is_eos = summary_ids == self.eos_id  # (B, S)
        first_eos = torch.where(is_eos, ar, s).min(-1).values  # (B,)
        last_tok = torch.where(summary_ids != self.pad_id, ar, 0).max(-1).values  # (B,)
        return torch.where(first_eos < s, first_eos, last_tok)

    @torch.no_grad()
    def generate_summary_ids(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Greedy (or beam, summary_num_beams) summary, bounded by summary_tokens: -> ids (B, S), EOS-terminated,
        0-padded."""
        b = states.shape[0]
        s = self.cfg.summary_tokens
        enc = states.reshape(b, -1, states.shape[-1])  # (B, G*L, D)
        gen = self.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=mask.reshape(b, -1).long(),
            max_new_tokens=s, min_new_tokens=1, do_sample=False, num_beams=self.cfg.summary_num_beams,
            no_repeat_ngram_size=self.cfg.summary_no_repeat_ngram,
            decoder_start_token_id=self.pad_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            synced_gpus=self.synced_generation,
        )[:, 1:]  # (B, <=S) drop the start token
        out = gen.new_full((b, s), self.pad_id)  # (B, S)
        out[:, : gen.shape[1]] = gen
        # Anything after the first EOS is padding (HF pads finished rows, but be exact).
        after = torch.cumsum((out == self.eos_id).long(), -1) - (out == self.eos_id).long() > 0  # (B, S)
        return out.masked_fill(after, self.pad_id)

    # ---- 3. user poly-embedding -------------------------------------------------------------------------
    def user_encoding(self, session_ids: torch.Tensor, summary_ids: torch.Tensor | None = None) -> UserEncoding:
        """UPE and the summary it was read from.

        summary_ids given: teacher-forced (training). None: the decoder generates the summary
        (greedy) and the global vector is read from a teacher-forced pass over that generation,
        so both modes give the same vector for the same summary.
        """
        states, mask = self.encode_sessions(session_ids)  # (B, G, L, D), (B, G, L)
        if summary_ids is None:
            summary_ids = self.generate_summary_ids(states, mask)  # (B, S)
        glob, seq = self.decode_summary(states, mask, summary_ids)  # (B, D), (B, S, D)
        items, item_mask = self.item_states(session_ids, states)  # (B, G*P, D), (B, G*P)
        z = torch.cat([items, glob[:, None, :]], dim=1)  # (B, G*P+1, D)
        z_mask = F.pad(item_mask, (0, 1), value=True)  # (B, G*P+1) the global vector is always valid
        upe = self.user_poly(z, z_mask)  # (B, M, D)
        return UserEncoding(upe=upe, summary_ids=summary_ids, summary_states=seq)

    def encode_user(self, session_ids: torch.Tensor, summary_ids: torch.Tensor | None = None) -> torch.Tensor:
        """session_ids (B, G, L) [, summary_ids (B, S)] -> UPE (B, M, D)."""
        return self.user_encoding(session_ids, summary_ids).upe

    def generate_summary(self, session_ids: torch.Tensor, tokenizer: Any) -> list[str]:
        """The user-interest summary as text (the paper's by-product, served as an explanation)."""
        states, mask = self.encode_sessions(session_ids)
        ids = self.generate_summary_ids(states, mask)
        return [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ids]

    # ---- 4. content poly-embedding ------------------------------------------------------------------------
    def encode_content(self, content_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """content_ids (I, Lc) -> CPE B (I, N, D) and its score key gelu(B W_s) (I, N, D)."""
        mask = content_ids != self.pad_id  # (I, Lc)
        states = self.t5.get_encoder()(
            input_ids=content_ids, attention_mask=mask.long()).last_hidden_state  # (I, Lc, D)
        cpe = self.content_poly(states, mask)  # (I, N, D)
        key = F.gelu(self.item_gate(cpe))  # (I, N, D)
        return cpe, key

    # ---- 5. scoring candidates ---------------------------------------------------------------------------
    def forward(self, session_ids: torch.Tensor, candidate_ids: torch.Tensor,
                summary_ids: torch.Tensor | None = None) -> EmbSumOutput:
        """session_ids (B, G, L), candidate_ids (B, C, Lc) [, summary_ids (B, S)] -> scores (B, C) [+ the
        summary's NLL].

        With summary_ids: teacher-forced (training), and the summary loss is computed here, where a
        ZeRO-3 engine has the LM head gathered. Without: the summary is generated, as at inference
        (validation scores what evaluation and serving will score), and no NLL."""
        b, c, lc = candidate_ids.shape
        forced = summary_ids is not None
        user = self.user_encoding(session_ids, summary_ids)
        nll = self.summary_nll(user.summary_states, user.summary_ids) if forced else None  # ()
        cpe, key = self.encode_content(candidate_ids.reshape(b * c, lc))  # (B*C, N, D) x2
        n, d = cpe.shape[-2:]
        cpe, key = cpe.view(b, c, n, d), key.view(b, c, n, d)  # (B, C, N, D) x2
        scores = score(user.upe, cpe, key)  # (B, C)
        return EmbSumOutput(scores=scores, summary_nll=nll, upe=user.upe, cpe=cpe, cpe_key=key)


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
