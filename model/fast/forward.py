"""Mllama forward passes over the fast engine's own static cache.

The weights stay in the transformers modules loaded by `MllamaForConditionalGeneration`: we call
the vision model, the projector, `embed_tokens`, the output and cross-attention projections and
`lm_head`, use the decoder layers' q/k/v and gate/up weights fused (`model.fast.layers`: one GEMM
each, the modules re-pointed at views, so no second copy), the norms' weights through one
`F.rms_norm` each, and write our own attention (SDPA) over `StaticKVCache`.

Two kinds of calls:

- `prefill`: chunks of prompts of a few requests (right-padded into one `[m, C]` batch), at any
  offset into their slot, so a long prompt is prefilled over several steps.
- `decode`: one token for each of the rows `0..n-1` (= slots `0..n-1`). Only tensor ops and
  shapes, no host syncs: the same function is what CUDA graphs capture (`graphs.py`).

The cross-attention row mask (huggingface/transformers#39379). A text token that may see no
image tile (every token of a text-only request, and the tokens before `<|image|>` of an image
request) has its cross-attention mask row fully masked. transformers turns such a row into an
all-zero bias (uniform attention over every vision token, padded tiles included), adds that
attention output through the gate, and zeroes only the MLP output. So a text-only row batched
with image rows gets an extra, batch-dependent term, and answers differently than alone. Meta's
reference code (llama-models `CrossAttention.forward`: `output = output *
full_text_row_masked_out_mask`), vLLM and SGLang zero both the attention output and the MLP
output. We do the same: for such rows the cross-attention layer adds exactly zero,
bit-identical to skipping the layer, which is what transformers itself does for a text-only
request alone. Consequence: an image request's pre-image tokens differ from transformers'
`generate()` (the reference tests patch the same fix into transformers:
`testkit.fast_reference.transformers_row_mask_fix`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model.fast.kv_cache import StaticKVCache
from model.fast.layers import LayerWeights, RotaryTables, rms_norm
from model.fast.vision_attention import vision_attention_without_mask


@dataclass
class PrefillChunk:
    """The next `tokens` of one request's prompt, starting at position `start` of its slot."""

    slot: int
    tokens: torch.Tensor  # [c] long, on the device
    start: int
    vision_mask: torch.Tensor | None  # [c, vision_len] bool: which vision tokens each token sees
    want_logits: bool  # the chunk ends the prompt: return the next-token logits


@dataclass
class DecodeInputs:
    """One decode step for rows `0..n-1`; every shape is fixed by (n, kv_len, vision_len).

    Only `ids` changes from step to step (one small host-to-device copy); the masks are built
    inside the step from the positions and the cache's per-slot vision masks, so a CUDA graph
    replays them too instead of a dozen small launches per step outside it.
    """

    ids: torch.Tensor  # [3, n] long: token, RoPE position, cache column to write (per row)
    kv_len: int  # self-attention keys read per row (columns 0..kv_len-1 of the slot)
    vision_len: int  # vision tokens read per row; 0: no row sees an image (layers skipped)

    @property
    def rows(self) -> int:
        return int(self.ids.shape[1])


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as SDPA's additive form: 0 where True, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _gated_cross_attention_mask(
    mask: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(additive mask safe for SDPA, row gate): fully masked rows attend to column 0, then get
    gated to 0.

    An all-False row would make SDPA's softmax NaN (0 * NaN is NaN, so gating afterwards would
    not help); pointing it at one real column keeps it finite, and the gate removes it.
    """
    seen = mask.any(dim=-1, keepdim=True)
    safe = mask.clone()
    safe[..., 0] |= ~seen[..., 0]
    return additive_mask(safe, dtype), seen.to(dtype)


class FastForward:
    """Forward passes of one loaded `MllamaForConditionalGeneration` over a `StaticKVCache`.

    Building it fuses the text layers' q/k/v and gate/up weights in place (`model.fast.layers`):
    the model keeps working as before, on views of the fused tensors.
    """

    def __init__(self, model: Any, cache: StaticKVCache) -> None:
        self.model = model
        self.cache = cache
        lm = model.model.language_model
        self.vision_model = model.model.vision_model
        self.projector = model.model.multi_modal_projector
        self.embed_tokens = lm.embed_tokens
        self.layers = list(lm.layers)
        self.cross_layers = frozenset(int(i) for i in lm.cross_attention_layers)
        self.norm = lm.norm
        self.lm_head = model.lm_head
        text = model.config.get_text_config(decoder=True)
        self.hidden_size = int(text.hidden_size)
        self.num_heads = int(text.num_attention_heads)
        self.kv_heads = int(text.num_key_value_heads)
        self.head_dim = self.hidden_size // self.num_heads
        self.n_rep = self.num_heads // self.kv_heads
        self.dtype = self.embed_tokens.weight.dtype
        self.device = self.embed_tokens.weight.device
        self.tokens_per_tile = int(self.vision_model.num_patches)
        with torch.no_grad():
            self.weights = [
                LayerWeights(layer, cross=i in self.cross_layers)
                for i, layer in enumerate(self.layers)
            ]
        # RoPE for every position of a slot: decode steps then index a table (no
        # data-dependent work inside a CUDA graph).
        self.rope = RotaryTables(lm.rotary_emb, cache.geometry.max_len + 1, self.dtype, self.device)

    # -- vision ----------------------------------------------------------------------------
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Projected vision states per image, real tiles only: `[tiles_i * tokens_per_tile, H]`.

        The encoder runs on the processor's padded tiles (real tiles attend to padded ones in
        Mllama's vision encoder, so trimming before would change the real tiles' states); the
        padded tiles are dropped from its output, before the projector. Its attention runs
        without transformers' N x N mask (`model.fast.vision_attention`: the same result).
        """
        with vision_attention_without_mask(self.vision_model):  # same result, no N x N mask
            out = self.vision_model(
                pixel_values=pixel_values.to(self.device, self.dtype),
                aspect_ratio_ids=aspect_ratio_ids.to(self.device),
                aspect_ratio_mask=aspect_ratio_mask.to(self.device),
            ).last_hidden_state  # [1, images, max_tiles, tokens_per_tile, vision_output_dim]
        states = []
        for i in range(out.shape[1]):
            tiles = int(aspect_ratio_mask[0, i].sum())
            real = out[0, i, :tiles].reshape(tiles * self.tokens_per_tile, -1)
            states.append(self.projector(real))
        return states

    def write_cross_kv(self, slot: int, states: torch.Tensor) -> None:
        """Project a request's vision states (`[N, H]`, its images in order) into its slot."""
        n = states.shape[0]
        for idx in self.cross_layers:
            attn = self.layers[idx].cross_attn
            k = attn.k_proj(states).view(n, self.kv_heads, self.head_dim)
            v = attn.v_proj(states).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            self.cache.cross_k[idx][slot, :, :n] = rms_norm(attn.k_norm, k).transpose(0, 1)
            self.cache.cross_v[idx][slot, :, :n] = v

    # -- layers ----------------------------------------------------------------------------
    def _qkv(
        self, idx: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q `[..., heads, D]`, rotated k and v `[..., kv_heads, D]` from one GEMM."""
        qkv_weight = self.weights[idx].qkv
        assert qkv_weight is not None
        qkv = F.linear(x, qkv_weight).unflatten(-1, (-1, self.head_dim))  # type: ignore[no-untyped-call]
        split = self.num_heads + self.kv_heads
        qk = RotaryTables.rotate(qkv[..., :split, :], cos, sin)
        return qk[..., : self.num_heads, :], qk[..., self.num_heads :, :], qkv[..., split:, :]

    def _attend_one(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention of one query token per row, on the KV heads (no repeat of K/V).

        `q` `[n, heads, D]` is viewed as `[n, kv_heads, n_rep, D]` (head h reads KV head
        h // n_rep, as `repeat_kv` does), the mask `[n, 1, 1, L]` broadcasts over both.
        """
        n = q.shape[0]
        packed = q.reshape(n, self.kv_heads, self.n_rep, self.head_dim)
        out = F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scale)
        return out.reshape(n, 1, self.num_heads * self.head_dim)

    def _cross_layer(
        self,
        idx: int,
        h: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        gate: torch.Tensor,
    ) -> torch.Tensor:
        """One cross-attention decoder layer with the #39379 fix (see the module docstring).

        `gate` `[rows, T, 1]` is 1 where the token sees at least one vision token, else 0; it
        multiplies both the attention output and the MLP output, so a fully masked row passes
        through unchanged (x + tanh(g) * 0 == x exactly).
        """
        layer = self.layers[idx]
        attn = layer.cross_attn
        x = rms_norm(layer.input_layernorm, h)
        rows, length, _ = x.shape
        q = attn.q_proj(x).view(rows, length, self.num_heads, self.head_dim)
        q = rms_norm(attn.q_norm, q)
        if length == 1:
            out = self._attend_one(q[:, 0], kv[0], kv[1], mask, attn.scaling)
        else:
            out = self._attend_many(q.transpose(1, 2), kv[0], kv[1], mask, attn.scaling)
        out = attn.o_proj(out)
        h = h + layer.cross_attn_attn_gate.tanh() * (gate * out)
        mlp = self.weights[idx].mlp(rms_norm(layer.post_attention_layernorm, h))
        gated: torch.Tensor = h + layer.cross_attn_mlp_gate.tanh() * (gate * mlp)
        return gated

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(rms_norm(self.norm, h)).float()
        return logits

    # -- decode ----------------------------------------------------------------------------
    def decode(self, inp: DecodeInputs) -> torch.Tensor:
        """Logits `[n, vocab]` (float32) of the next token for rows `0..n-1`."""
        n, kv_len, vision_len = inp.rows, inp.kv_len, inp.vision_len
        tokens, positions, write_index = inp.ids[0], inp.ids[1], inp.ids[2]
        rows = torch.arange(n, device=self.device)
        keys = torch.arange(kv_len, device=self.device)
        causal = (keys[None, :] <= positions[:, None])[:, None, None]  # [n, 1, 1, kv_len]
        self_mask = additive_mask(causal, self.dtype)
        cross_mask = row_gate = None
        cache = self.cache
        if vision_len > 0:
            safe, gate = _gated_cross_attention_mask(cache.vision_mask[:n, :vision_len], self.dtype)
            cross_mask, row_gate = safe[:, None, None], gate[:, None]  # [n,1,1,V], [n,1,1]
        cos, sin = self.rope.at(positions)  # [n, 1, D]
        h = self.embed_tokens(tokens)[:, None]  # [n, 1, hidden]
        for idx, layer in enumerate(self.layers):
            if idx in self.cross_layers:
                if cross_mask is None or row_gate is None:
                    continue  # no row sees an image: the layer would add exactly zero
                kv = (
                    cache.cross_k[idx][:n, :, :vision_len],
                    cache.cross_v[idx][:n, :, :vision_len],
                )
                h = self._cross_layer(idx, h, kv, cross_mask, row_gate)
                continue
            x = rms_norm(layer.input_layernorm, h[:, 0])  # [n, hidden]
            q, k, v = self._qkv(idx, x, cos, sin)  # [n, heads, D], [n, kv_heads, D] x 2
            kc, vc = cache.self_k[idx], cache.self_v[idx]
            kc[rows, :, write_index] = k
            vc[rows, :, write_index] = v
            out = self._attend_one(
                q, kc[:n, :, :kv_len], vc[:n, :, :kv_len], self_mask, layer.self_attn.scaling
            )
            h = h + layer.self_attn.o_proj(out)
            h = h + self.weights[idx].mlp(rms_norm(layer.post_attention_layernorm, h))
        return self._logits(h[:, 0])

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Write the chunks' K/V into their slots; logits `[m, vocab]` at each chunk's end.

        Rows are right-padded to the longest chunk; only real positions are written to the
        cache, and padded positions' outputs are discarded.
        """
        m = len(chunks)
        width = max(int(c.tokens.shape[0]) for c in chunks)
        lengths = [int(c.tokens.shape[0]) for c in chunks]
        kv_len = max(c.start + n for c, n in zip(chunks, lengths, strict=True))
        tokens = torch.zeros(m, width, dtype=torch.long, device=self.device)
        positions = torch.zeros(m, width, dtype=torch.long, device=self.device)
        t = torch.arange(width, device=self.device)
        for i, (c, n) in enumerate(zip(chunks, lengths, strict=True)):
            tokens[i, :n] = c.tokens
            # Padded queries reuse the last real position: finite, causal, discarded.
            positions[i] = c.start + t.clamp(max=n - 1)
        keys = torch.arange(kv_len, device=self.device)
        causal = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [m, 1, C, L]
        self_mask = additive_mask(causal, self.dtype)
        cross = self._prefill_cross_mask(chunks, lengths, width)
        cos, sin = self.rope.at(positions)  # [m, C, 1, D]
        slots = [c.slot for c in chunks]
        h = self.embed_tokens(tokens)
        cache = self.cache
        for idx, layer in enumerate(self.layers):
            if idx in self.cross_layers:
                if cross is None:
                    continue  # no token of these chunks sees an image: the layer adds zero
                vis_mask, gate = cross
                kv = (
                    self._rows(cache.cross_k[idx], slots, vis_mask.shape[-1]),
                    self._rows(cache.cross_v[idx], slots, vis_mask.shape[-1]),
                )
                h = self._cross_layer(idx, h, kv, vis_mask, gate)
                continue
            x = rms_norm(layer.input_layernorm, h)
            q, k, v = self._qkv(idx, x, cos, sin)  # [m, C, heads, D], [m, C, kv_heads, D] x 2
            kc, vc = cache.self_k[idx], cache.self_v[idx]
            for i, (c, n) in enumerate(zip(chunks, lengths, strict=True)):
                kc[c.slot, :, c.start : c.start + n] = k[i, :n].transpose(0, 1)
                vc[c.slot, :, c.start : c.start + n] = v[i, :n].transpose(0, 1)
            keys_k = self._rows(kc, slots, kv_len)
            keys_v = self._rows(vc, slots, kv_len)
            out = self._attend_many(
                q.transpose(1, 2), keys_k, keys_v, self_mask, layer.self_attn.scaling
            )
            h = h + layer.self_attn.o_proj(out)
            h = h + self.weights[idx].mlp(rms_norm(layer.post_attention_layernorm, h))
        wanted = [i for i, c in enumerate(chunks) if c.want_logits]
        if not wanted:
            return torch.empty(0, self.lm_head.out_features, device=self.device)
        last = torch.stack([h[i, lengths[i] - 1] for i in wanted])
        return self._logits(last)

    @staticmethod
    def _rows(tensor: torch.Tensor, slots: list[int], length: int) -> torch.Tensor:
        """`tensor[slots, :, :length]`, a view when there is one slot (the common case)."""
        if len(slots) == 1:
            return tensor[slots[0] : slots[0] + 1, :, :length]
        return torch.stack([tensor[s, :, :length] for s in slots])

    def _attend_many(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        rows, _, length, _ = q.shape
        # repeat_kv (expand + copy) rather than enable_gqa: every SDPA backend takes it with a
        # mask, and prefill is compute-bound anyway.
        k = k.repeat_interleave(self.n_rep, dim=1)
        v = v.repeat_interleave(self.n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(rows, length, self.num_heads * self.head_dim)

    def _prefill_cross_mask(
        self, chunks: list[PrefillChunk], lengths: list[int], width: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mask `[m, 1, C, V]`, gate `[m, C, 1]`), or None when no token sees an image."""
        masks = [c.vision_mask for c in chunks]
        if not any(mk is not None and bool(mk.any()) for mk in masks):
            return None
        vision_len = max(mk.shape[-1] for mk in masks if mk is not None)
        full = torch.zeros(len(chunks), width, vision_len, dtype=torch.bool, device=self.device)
        for i, (mk, n) in enumerate(zip(masks, lengths, strict=True)):
            if mk is not None:
                full[i, :n, : mk.shape[-1]] = mk
        safe, gate = _gated_cross_attention_mask(full, self.dtype)
        return safe[:, None], gate


def make_decode_inputs(
    cache: StaticKVCache,
    rows: dict[int, tuple[int, int]],
    *,
    n: int,
    kv_len: int,
    vision_len: int,
) -> DecodeInputs:
    """Inputs of one decode step for rows `0..n-1`; `rows` maps slot -> (token, position).

    Slots in `0..n-1` not in `rows` are idle: token 0 at position 0, attending to column 0
    only (finite, discarded) and writing to the scratch column. The step's cross mask is the
    cache's per-slot vision masks (`vision_len` 0: no row sees an image, layers skipped).
    """
    tokens, positions, write = [0] * n, [0] * n, [cache.scratch] * n
    for slot, (token, position) in rows.items():
        tokens[slot], positions[slot], write[slot] = token, position, position
    ids = torch.tensor([tokens, positions, write], dtype=torch.long).to(cache.device)
    return DecodeInputs(ids=ids, kv_len=kv_len, vision_len=vision_len)
