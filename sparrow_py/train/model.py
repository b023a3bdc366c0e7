"""The Sparrow draft of spec v1 as a plain torch module (DESIGN.md section 4, docs/draft.md).

One decoder layer, EAGLE-3 style, that reads the target's hidden states:

    g_t     = fc(concat(taps_t))                                 taps: target layer inputs at t
    x_t     = concat(embed_norm(E[y_{t+1}]), hidden_norm(g_t))   width 2H
    a_t     = o_proj(attn(q(x_t), k(x_t), v(x_t)))               VATA mask, RoPE at the target's text position
    r_t     = g_t + a_t                                          the residual stream is g
    h_t     = r_t + down(silu(gate(ffn_norm(r_t))) * up(ffn_norm(r_t)))
    logits  = head(output_norm(h_t))                             target's frozen head, or reduced head + d2t

With num_layers > 1, plain pre-norm decoder layers follow, each on the one below's output h:

    h'_t    = h_t + o_proj'(attn(q'(n), k'(n), v'(n)))         n = attn_norm'(h_t), the same VATA mask
    h_t    <- h'_t + down'(silu(gate'(ffn_norm'(h'_t))) * up'(ffn_norm'(h'_t)))

and the last layer's h_t feeds the head. A layer added on top starts as the identity (its o_proj
and down_proj are zero), so a deeper draft can start from a trained shallower one.

h_t (before the final norm) replaces g at the next drafted position. Glimpses are G vectors
pooled from the target's ivsb_layer outputs at visual positions; each enters the KV once as
x = concat(0, hidden_norm(glimpse_proj(pool))) at the position of its segment's first visual token
(in a layer above the first, as n = attn_norm'(glimpse_proj(pool))).

Two ways to run the same math, which tests/test_train_model.py holds equal to 1e-5:
  forward_mtp()  training over whole sequences, k MTP steps unrolled, VATA as a dense mask;
  step()         inference one entry at a time with a DraftCache (glimpses + S anchors + ring
                 of W + the current speculative chain), the path the C++ runtime mirrors.
Both decide visibility with the one function vata_visible().
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The draft's own config.json carries this in "model_type" / "architectures" so the converter can
# tell a draft folder from a Hugging Face model folder.
DRAFT_MODEL_TYPE = "sparrow-draft"
DRAFT_ARCHITECTURE = "SparrowDraft"
# The most decoder layers a draft may have (sparrow_py.convert.draft and the runtime's
# kMaxDraftLayers hold the same bound).
MAX_DRAFT_LAYERS = 16


class DraftConfigError(ValueError):
    """A draft configuration that is inconsistent, or that does not fit the target."""


@dataclass
class DraftConfig:
    # --- the target this draft reads (checked by check_fits) ---
    target_arch: str                 # GGUF architecture of the target LM: llama, qwen2, qwen2vl
    target_num_layers: int           # L
    vocab_size: int                  # V, the target's vocabulary
    hidden_size: int                 # H (the target's; the draft works at the same width)
    # --- the draft layers (GQA like the target's) ---
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # --- spec v1 knobs ---
    taps: list[int] = field(default_factory=list)  # target layer inputs; L = final hidden state before the norm
    ivsb_layer: int = 0              # output of target decoder layer ivsb_layer (0-based) feeds the glimpses
    glimpses: int = 8                # G; 0 turns glimpsing off
    anchors: int = 32                # S
    window: int = 256                # W; 0 = unbounded (EAGLE-3)
    draft_vocab_size: int = 0        # N; 0 or V = the target's full head (no d2t)
    target_tie_word_embeddings: bool = True
    num_layers: int = 1              # decoder layers (the first reads concat(E[y], g); the others h)

    @property
    def reduced_vocab(self) -> bool:
        return 0 < self.draft_vocab_size < self.vocab_size

    @property
    def n_draft_vocab(self) -> int:
        return self.draft_vocab_size if self.reduced_vocab else self.vocab_size

    def validate(self) -> None:
        L, H = self.target_num_layers, self.hidden_size
        if not self.taps:
            raise DraftConfigError("taps: at least one target layer is needed")
        for t in self.taps:
            if not 0 <= t <= L:
                raise DraftConfigError(f"tap {t} is outside 0..{L} (the target has {L} layers)")
        if not 0 <= self.ivsb_layer < L:
            raise DraftConfigError(f"ivsb_layer {self.ivsb_layer} is outside 0..{L - 1}")
        if self.glimpses < 0 or self.anchors < 0 or self.window < 0:
            raise DraftConfigError("glimpses, anchors and window must be >= 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise DraftConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise DraftConfigError(f"head_dim {self.head_dim} is odd (RoPE rotates pairs)")
        if self.draft_vocab_size < 0 or self.draft_vocab_size > self.vocab_size:
            raise DraftConfigError(f"draft_vocab_size {self.draft_vocab_size} is outside 0..{self.vocab_size}")
        if H <= 0:
            raise DraftConfigError("hidden_size must be positive")
        if self.intermediate_size <= 0:
            raise DraftConfigError(f"intermediate_size {self.intermediate_size} must be positive")
        if not 1 <= self.num_layers <= MAX_DRAFT_LAYERS:
            raise DraftConfigError(f"num_layers {self.num_layers} is outside 1..{MAX_DRAFT_LAYERS}")

    # --- (de)serialisation: config.json of an exported draft folder ---
    def to_dict(self) -> dict[str, Any]:
        d = {"model_type": DRAFT_MODEL_TYPE, "architectures": [DRAFT_ARCHITECTURE], "spec_version": 1}
        d.update(asdict(self))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DraftConfig":
        if d.get("model_type") != DRAFT_MODEL_TYPE:
            raise DraftConfigError(f"not a Sparrow draft config (model_type {d.get('model_type')!r})")
        names = cls.__dataclass_fields__.keys()
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.taps = [int(t) for t in cfg.taps]
        cfg.validate()
        return cfg

    def save(self, folder: str | Path) -> None:
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> "DraftConfig":
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")))

    # --- building from, and checking against, a target ---
    @classmethod
    def for_target(cls, target: "TargetShape", *, taps: list[int] | None = None, ivsb_layer: int | None = None,
                   glimpses: int = 8, anchors: int = 32, window: int = 256, draft_vocab_size: int = 0,
                   intermediate_size: int = 0, num_layers: int = 1) -> "DraftConfig":
        """intermediate_size 0: the target's FFN width."""
        L = target.num_layers
        cfg = cls(target_arch=target.arch, target_num_layers=L, vocab_size=target.vocab_size,
                  hidden_size=target.hidden_size,
                  intermediate_size=intermediate_size or target.intermediate_size,
                  num_attention_heads=target.num_attention_heads, num_key_value_heads=target.num_key_value_heads,
                  head_dim=target.head_dim, rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta,
                  taps=list(taps) if taps is not None else default_taps(L),
                  ivsb_layer=default_ivsb_layer(L) if ivsb_layer is None else ivsb_layer,
                  glimpses=glimpses, anchors=anchors, window=window, draft_vocab_size=draft_vocab_size,
                  target_tie_word_embeddings=target.tie_word_embeddings, num_layers=num_layers)
        cfg.validate()
        return cfg

    def check_fits(self, target: "TargetShape") -> None:
        """Refuse a target this draft was not made for (arch, H, vocab, layer count)."""
        wrong = []
        for what, mine, theirs in (("architecture", self.target_arch, target.arch),
                                   ("hidden size", self.hidden_size, target.hidden_size),
                                   ("vocab size", self.vocab_size, target.vocab_size),
                                   ("layer count", self.target_num_layers, target.num_layers)):
            if mine != theirs:
                wrong.append(f"{what} {theirs} (draft expects {mine})")
        if wrong:
            raise DraftConfigError("draft does not fit this target: " + ", ".join(wrong))


def default_taps(num_layers: int) -> list[int]:
    """llama.cpp's eagle3 convention: inputs of layers 2, L/2, L-3 (clamped and deduplicated for tiny L)."""
    L = num_layers
    taps = sorted({min(max(t, 0), L) for t in (2, L // 2, L - 3)})
    return taps


def default_ivsb_layer(num_layers: int) -> int:
    return min(max(int(round(0.7 * num_layers)), 0), num_layers - 1)


@dataclass
class TargetShape:
    """What a draft needs to know about its target (see sparrow_py.train.target.target_shape)."""
    arch: str
    num_layers: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool


# --- VATA: the one visibility rule ------------------------------------------------------------

def vata_visible(q_index: torch.Tensor, k_index: torch.Tensor, anchor_start: torch.Tensor | int,
                 n_anchors: int, window: int) -> torch.Tensor:
    """May the draft entry with index q_index attend to the entry with index k_index?

    Indices count draft text entries (0, 1, 2, ... over the text positions of the sequence, the
    speculative chain continuing the count). Visible: k <= q, and k is an anchor (one of the first
    n_anchors entries from anchor_start, the first text position after the video) or k is one of
    the last `window` entries up to q (window 0: no limit). Glimpses are always visible and are not
    passed through here. Broadcasts over its tensor arguments.
    """
    causal = k_index <= q_index
    is_anchor = (k_index >= anchor_start) & (k_index < anchor_start + n_anchors)
    if window > 0:
        in_window = (q_index - k_index) < window
    else:
        in_window = torch.ones_like(causal)
    return causal & (is_anchor | in_window)


# --- building blocks --------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 like the HF targets, whatever the autocast dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NEOX ("rotate half", HF layout) RoPE tables for integer positions [...]: returns [..., head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim))
    ang = positions.to(torch.float64)[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n_heads, head_dim]; cos/sin [..., head_dim] (broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """q [B, Q, nh, hd], k/v [B, K, nkv, hd], visible [B, Q, K] bool -> [B, Q, nh*hd], in float32.
    GQA by grouping. torch's fused attention: 10-20% of a CPU training step less than scores,
    mask, softmax and product written out (same losses, gradients within 3e-7)."""
    nh, nkv = q.shape[-2], k.shape[-2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                         v.transpose(1, 2).float(), attn_mask=visible[:, None],
                                         enable_gqa=nh != nkv)
    # a row with nothing visible (padding) gets zeros (NaN on some of torch's paths: made zero)
    out = torch.nan_to_num(out, nan=0.0)
    return out.transpose(1, 2).to(q.dtype).flatten(-2)


def attend_chain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                 chain_k: torch.Tensor, chain_v: torch.Tensor, chain_visible: torch.Tensor) -> torch.Tensor:
    """attend() over shared keys plus each query's own chain: q [B, M, nh, hd]; k/v [B, K, nkv,
    hd] seen by every query through visible [B, M, K]; chain_k/chain_v [B, M, s, nkv, hd], the s
    keys of query m's own chain, seen through chain_visible [B or 1, M, s]. -> [B, M, nh*hd], in
    float32. The same as attend() with the chain keys laid out as s diagonal M x M blocks (the
    k + 1 MTP steps as training unrolls them), without the (1 + s) M-wide scores that are all but
    the diagonal masked: at step 2 of the real pair's draft that layout was most of a step's
    attention. A query that sees no key gets an average of them all rather than attend()'s zeros
    (forward_mtp drops such rows: a draft query it computes always sees itself)."""
    with torch.autocast(device_type=q.device.type, enabled=False):   # float32 products, as attend()'s
        return _attend_chain(q, k, v, visible, chain_k, chain_v, chain_visible)


def _attend_chain(q, k, v, visible, chain_k, chain_v, chain_visible):
    B, M, nh, hd = q.shape
    K, nkv = k.shape[1], k.shape[2]
    g = nh // nkv
    scale = hd ** -0.5
    never = torch.finfo(torch.float32).min
    qf = q.float().view(B, M, nkv, g, hd)
    # GQA: query head n*g + i reads key head n, so a key head's g queries share its products
    scores = (qf.permute(0, 2, 1, 3, 4).reshape(B, nkv, M * g, hd) @ k.float().permute(0, 2, 3, 1))
    scores = scores.view(B, nkv, M, g, K).mul(scale).masked_fill(~visible[:, None, :, None, :], never)
    own = torch.einsum("bmngd,bmsnd->bnmgs", qf, chain_k.float()).mul(scale)
    own = own.masked_fill(~chain_visible[:, None, :, None, :], never)
    p = torch.softmax(torch.cat([scores, own], -1), -1)
    out = (p[..., :K].reshape(B, nkv, M * g, K) @ v.float().transpose(1, 2)).view(B, nkv, M, g, hd)
    out = out + torch.einsum("bnmgs,bmsnd->bnmgd", p[..., K:], chain_v.float())
    return out.permute(0, 2, 1, 3, 4).reshape(B, M, nh * hd).to(q.dtype)


# --- the step-by-step KV cache (what the runtime mirrors) ---------------------------------------

class DraftCache:
    """The draft's KV for one sequence: G glimpses, S anchors, a ring of W, the speculative chain.

    Committed entries carry the target's real features; the chain holds the entries drafted from
    the draft's own hidden states since the last commit and is dropped by drop_speculative().
    An entry's K and V are [num_layers, n_kv_heads, head_dim]: every layer's, one slot for all.
    Nothing here depends on the number of visual tokens.
    """

    def __init__(self, config: DraftConfig, anchor_start: int):
        self.config = config
        self.anchor_start = anchor_start
        self.n_committed = 0
        self.glimpse_k: list[torch.Tensor] = []
        self.glimpse_v: list[torch.Tensor] = []
        self.anchor: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (index, k, v)
        self.ring: list[tuple[int, torch.Tensor, torch.Tensor]] = []    # oldest first, at most W (unbounded if W = 0)
        self.chain: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    @property
    def next_index(self) -> int:
        return self.n_committed + len(self.chain)

    def n_entries(self) -> int:
        return len(self.glimpse_k) + len(self.anchor) + len(self.ring) + len(self.chain)

    def add(self, index: int, k: torch.Tensor, v: torch.Tensor, speculative: bool) -> None:
        if speculative:
            self.chain.append((index, k, v))
            return
        assert not self.chain, "commit entries only after drop_speculative()"
        assert index == self.n_committed
        S, W = self.config.anchors, self.config.window
        if self.anchor_start <= index < self.anchor_start + S:
            self.anchor.append((index, k, v))
        else:
            self.ring.append((index, k, v))
            if W > 0 and len(self.ring) > W:
                # the oldest ring entry has index <= index - W: no later query can see it
                self.ring.pop(0)
        self.n_committed += 1

    def drop_speculative(self) -> None:
        self.chain.clear()

    def keys(self, q_index: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All cached K, V and their visibility for a query with draft index q_index."""
        entries = self.anchor + self.ring + self.chain
        ks = self.glimpse_k + [e[1] for e in entries]
        vs = self.glimpse_v + [e[2] for e in entries]
        idx = torch.tensor([e[0] for e in entries], dtype=torch.long, device=device)
        text_visible = vata_visible(torch.tensor(q_index, device=device), idx, self.anchor_start,
                                    self.config.anchors, self.config.window)
        visible = torch.cat([torch.ones(len(self.glimpse_k), dtype=torch.bool, device=device), text_visible])
        return torch.stack(ks), torch.stack(vs), visible


# --- the module -----------------------------------------------------------------------------

class DraftBlock(nn.Module):
    """A draft layer above the first (GGUF blk.i, i >= 1): a pre-norm decoder layer on the layer
    below's output h, with the same attention shape and FFN width as the first."""

    def __init__(self, c: DraftConfig):
        super().__init__()
        H = c.hidden_size
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.attn_norm = RMSNorm(H, c.rms_norm_eps)
        self.q_proj = nn.Linear(H, q_dim, bias=False)
        self.k_proj = nn.Linear(H, kv_dim, bias=False)
        self.v_proj = nn.Linear(H, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, H, bias=False)
        self.ffn_norm = RMSNorm(H, c.rms_norm_eps)
        self.gate_proj = nn.Linear(H, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, H, bias=False)


class SparrowDraft(nn.Module):
    """The spec v1 draft. Parameters are the draft's own; E and the full head are frozen buffers
    taken from the target (set_target_weights) and are never saved with the draft. The first
    layer's weights sit on the module itself (q_proj, ...), the layers above in `layers` ("1", ...)."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        H, nT = c.hidden_size, len(c.taps)
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.fc = nn.Linear(nT * H, H, bias=False)
        self.embed_norm = RMSNorm(H, c.rms_norm_eps)      # GGUF blk.0.attn_norm
        self.hidden_norm = RMSNorm(H, c.rms_norm_eps)     # GGUF blk.0.attn_norm_2
        self.q_proj = nn.Linear(2 * H, q_dim, bias=False)
        self.k_proj = nn.Linear(2 * H, kv_dim, bias=False)
        self.v_proj = nn.Linear(2 * H, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, H, bias=False)
        self.ffn_norm = RMSNorm(H, c.rms_norm_eps)
        self.gate_proj = nn.Linear(H, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, H, bias=False)
        self.output_norm = RMSNorm(H, c.rms_norm_eps)
        self.glimpse_proj = nn.Linear(H, H, bias=False)
        self.layers = nn.ModuleDict({str(i): DraftBlock(c) for i in range(1, c.num_layers)})
        if c.reduced_vocab:
            self.lm_head = nn.Linear(H, c.draft_vocab_size, bias=False)   # trained; GGUF "output"
            self.register_buffer("d2t", torch.arange(c.draft_vocab_size, dtype=torch.long))  # draft id -> target id
        else:
            self.lm_head = None
            self.d2t = None
        # frozen, shared with the target: not in state_dict
        self.register_buffer("target_embed", torch.zeros(c.vocab_size, H), persistent=False)
        self.register_buffer("target_head", torch.zeros(0, H), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        gen = torch.Generator().manual_seed(0)
        std = 0.02
        for lin in (self.fc, self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.gate_proj, self.up_proj,
                    self.down_proj, self.glimpse_proj):
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * std)
        # the layers above start as the identity: their o_proj and down_proj are zero (see widen_ffn
        # and deepen in trainer.py for why a change of shape keeps the outputs)
        for block in self.layers.values():
            with torch.no_grad():
                for lin in (block.q_proj, block.k_proj, block.v_proj, block.gate_proj, block.up_proj):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * std)
                block.o_proj.weight.zero_()
                block.down_proj.weight.zero_()

    def decoder_layers(self) -> list[nn.Module]:
        """The layers in order: the module itself (its first layer's weights), then `layers`."""
        return [self, *self.layers.values()]

    def set_target_weights(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        """E [V, H] and the LM head W [V, H] of the target (frozen; tied models pass E twice)."""
        c = self.config
        if embed.shape != (c.vocab_size, c.hidden_size) or head.shape != (c.vocab_size, c.hidden_size):
            raise DraftConfigError(f"target embedding/head shapes {tuple(embed.shape)}/{tuple(head.shape)} do not match "
                                   f"the draft's vocab {c.vocab_size} x hidden {c.hidden_size}")
        self.target_embed = embed.detach().to(self.fc.weight.device, torch.float32).clone()
        self.target_head = head.detach().to(self.fc.weight.device, torch.float32).clone()

    # --- pieces shared by both paths ---
    def fuse_taps(self, taps: torch.Tensor) -> torch.Tensor:
        """g = fc(concat(taps)); taps [..., len(taps)*H]."""
        return self.fc(taps.to(self.fc.weight.dtype))

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor, layer: nn.Module):
        """q, k, v of `layer` (one of decoder_layers()) on its input x, RoPE'd at positions."""
        c = self.config
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        q = layer.q_proj(x).unflatten(-1, (c.num_attention_heads, c.head_dim))
        k = layer.k_proj(x).unflatten(-1, (c.num_key_value_heads, c.head_dim))
        v = layer.v_proj(x).unflatten(-1, (c.num_key_value_heads, c.head_dim))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _layer_input(self, layer: nn.Module, tokens: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """What `layer`'s q/k/v read: concat(embed_norm(E[y]), hidden_norm(g)) in the first layer,
        attn_norm(h) of the layer below's output h in the others."""
        if layer is not self:
            return layer.attn_norm(g)
        e = F.embedding(tokens, self.target_embed).to(g.dtype)
        return torch.cat([self.embed_norm(e), self.hidden_norm(g)], dim=-1)

    def _glimpse_inputs(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's input for the glimpses: the first layer's concat(0, hidden_norm(p)), the
        others' attn_norm(p), p = glimpse_proj(pooled) standing in for a glimpse's state."""
        p = self.glimpse_proj(pooled.to(self.glimpse_proj.weight.dtype))
        first = torch.cat([torch.zeros_like(p), self.hidden_norm(p)], dim=-1)
        return [first] + [block.attn_norm(p) for block in self.layers.values()]

    def _finish(self, layer: nn.Module, attn_out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        r = g + layer.o_proj(attn_out)
        n = layer.ffn_norm(r)
        return r + layer.down_proj(F.silu(layer.gate_proj(n)) * layer.up_proj(n))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits (N = draft_vocab_size if reduced, else V) from the pre-norm state h."""
        n = self.output_norm(h)
        if self.lm_head is not None:
            return self.lm_head(n)
        return n @ self.target_head_rows(n.dtype).t()   # converted once, not at every call

    def target_head_rows(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The target's frozen head at the draft vocabulary [N, H] (all of it without d2t), in
        dtype; kept until d2t or the head changes, as training asks for it every step."""
        if self.d2t is None and dtype == self.target_head.dtype:
            return self.target_head
        key = (self.target_head.data_ptr(), self.target_head._version, self.target_head.device, dtype,
               None if self.d2t is None else (self.d2t.data_ptr(), self.d2t._version))
        if getattr(self, "_head_rows_key", None) != key:
            rows = self.target_head if self.d2t is None else self.target_head[self.d2t]
            self._head_rows = rows.to(dtype)
            self._head_rows_key = key
        return self._head_rows

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.d2t[draft_ids] if self.d2t is not None else draft_ids

    # --- (a) training: whole sequences, k MTP steps ---
    def forward_mtp(self, taps: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                    n_entries: torch.Tensor, anchor_start: torch.Tensor, steps: int,
                    glimpses: torch.Tensor | None = None, glimpse_positions: torch.Tensor | None = None,
                    glimpse_valid: torch.Tensor | None = None, logit_rows: torch.Tensor | None = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run steps+1 unrolled draft steps over a padded batch of draft sequences.

        taps [B, M, nT*H]: target tap inputs at the M draft entries (text positions p_j)
        tokens [B, M, steps+1]: tokens[b, j, s] = the token at target position p_j + 1 + s
        positions [B, M]: RoPE position of entry j (the target's text position id of p_j)
        n_entries [B]: valid entries per row (the rest is padding); anchor_start [B]: first entry after the video
        glimpses [B, G, H] (pooled ivsb outputs, before glimpse_proj), glimpse_positions [B, G], glimpse_valid [B, G]

        Step s is the chain that started at entry j0 = j after s drafted tokens: query index j0 + s,
        position positions[j0] + s, input (tokens[j0, s], h^{s-1}[j0]) with h^{-1} = fc(taps). It sees
        the glimpses, the committed (step 0) entries j' <= j0 and its own chain entries 1..s, all
        filtered by vata_visible: exactly what step() sees at inference.
        logit_rows [B, M, steps+1] bool: if given, step s's logits only at logit_rows[:, :, s], as
        [n_s, N] in row-major order, and step s computed only where some step >= s has a logit row
        (its h elsewhere is 0; step 0 still gives every entry its key and value). Training passes
        the entries with a target (padding and the entries near the end have none, and with
        --loss-fraction most), which spares the head and the steps those rows.
        Padding rows are never computed: their h is 0.
        Returns (logits per step [B, M, N] or [n_s, N], pre-norm hidden states per step [B, M, H]).
        """
        c = self.config
        B, M = tokens.shape[:2]
        dev = tokens.device
        j = torch.arange(M, device=dev)
        entry_valid = j[None, :] < n_entries[:, None]                      # [B, M]
        a0 = anchor_start[:, None, None]

        layers = self.decoder_layers()
        if glimpses is not None and glimpses.shape[1] > 0:
            gk, gv = self._qkv_glimpses(glimpses, glimpse_positions)     # per layer
            g_vis = glimpse_valid[:, None, :].expand(B, M, -1)
        else:
            gk = gv = None

        # rows computed at each step, packed: the products run on them alone and are scattered
        # back to [B, M, ...] for the masked attention (a row not computed is 0 there, and no
        # computed query sees it: padding keys are masked, a chain key is seen only by its own chain)
        # out_rows[s]: where step s's output is needed, i.e. it or a later step of the same chain
        # has a logit row; its keys and values are computed there too, except at step 0, whose
        # keys and values every entry needs (the context of the others)
        if logit_rows is None:
            out_rows = [entry_valid] * (steps + 1)
        else:
            later = logit_rows.flip(-1).cummax(-1).values.flip(-1)
            out_rows = [entry_valid & later[:, :, s] for s in range(steps + 1)]

        def dense(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            out = packed.new_zeros(*rows.shape, *packed.shape[1:])
            out[rows] = packed
            return out

        g_dense = dense(self.fuse_taps(taps[entry_valid]), entry_valid)   # step s's input state
        ks = [[] for _ in layers]   # per layer: step-0 K/V, then each chain step's K/V
        vs = [[] for _ in layers]
        all_logits, all_h = [], []
        for s in range(steps + 1):
            rows = entry_valid if s == 0 else out_rows[s]
            q_idx = (j + s)[None, :, None]                                 # [1, M, 1]
            # committed entries j' <= j0
            k0 = j[None, None, :]
            vis0 = vata_visible(q_idx, k0, a0, c.anchors, c.window) & (k0 <= j[None, :, None]) & entry_valid[:, None, :]
            # chain entries r = 1..s: each query's own, at its own row of ks[l][r]
            r = torch.arange(1, s + 1, device=dev)
            chain_vis = vata_visible(q_idx, (j[:, None] + r)[None], a0, c.anchors, c.window)   # [B, M, s]
            h_dense = g_dense
            for li, layer in enumerate(layers):
                x = self._layer_input(layer, tokens[:, :, s][rows], h_dense[rows])
                q, k, v = self._qkv(x, (positions + s)[rows], layer)
                q, k, v = dense(q, rows), dense(k, rows), dense(v, rows)
                ks[li].append(k)
                vs[li].append(v)
                vis_parts, k_parts, v_parts = [vis0], [ks[li][0]], [vs[li][0]]
                if gk is not None:
                    vis_parts.insert(0, g_vis)
                    k_parts.insert(0, gk[li])
                    v_parts.insert(0, gv[li])
                out = attend_chain(q, torch.cat(k_parts, 1), torch.cat(v_parts, 1), torch.cat(vis_parts, 2),
                                   torch.stack(ks[li][1:], 2) if s else k.new_zeros(B, M, 0, *k.shape[2:]),
                                   torch.stack(vs[li][1:], 2) if s else v.new_zeros(B, M, 0, *v.shape[2:]), chain_vis)
                # the last layer's output where a logit needs it; below it, every row whose
                # keys the next layer needs (at step 0 all entries)
                fin = out_rows[s] if li == len(layers) - 1 else rows
                h_dense = dense(self._finish(layer, out[fin], h_dense[fin]), fin)
            g_dense = h_dense
            all_h.append(h_dense)
            all_logits.append(self.logits(h_dense if logit_rows is None else h_dense[logit_rows[:, :, s]]))
        return all_logits, all_h

    forward = forward_mtp  # nn.Module.__call__ (and DDP) run the training path

    def _qkv_glimpses(self, pooled: torch.Tensor, positions: torch.Tensor) -> tuple[list, list]:
        """The glimpses' keys and values, one [B, G, n_kv, hd] per layer."""
        ks, vs = [], []
        for layer, x in zip(self.decoder_layers(), self._glimpse_inputs(pooled)):
            _, k, v = self._qkv(x, positions, layer)
            ks.append(k)
            vs.append(v)
        return ks, vs

    # --- (b) inference: one entry at a time ---
    def add_glimpses(self, cache: DraftCache, pooled: torch.Tensor, positions: torch.Tensor) -> None:
        """Enter the G pooled glimpses [G, H] (positions [G]) into the cache, once, after prefill."""
        if pooled.shape[0] == 0:
            return
        ks, vs = self._qkv_glimpses(pooled[None], positions[None])
        cache.glimpse_k.extend(torch.stack([k[0] for k in ks], 1))   # [G, layers, n_kv, hd]
        cache.glimpse_v.extend(torch.stack([v[0] for v in vs], 1))

    def step(self, cache: DraftCache, token: int, g: torch.Tensor, position: int,
             speculative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft entry: input token y (the token after this entry's text position) and g [H]
        (fc(taps) for a committed entry, the previous step's h for a speculative one), at RoPE
        position `position`. Adds the entry to the cache and returns (logits [N], h [H])."""
        dev = g.device
        index = cache.next_index
        tok, pos = torch.tensor([[token]], device=dev), torch.tensor([[position]], device=dev)
        layers = self.decoder_layers()
        h = g.reshape(1, 1, -1)
        for li, layer in enumerate(layers):
            q, k, v = self._qkv(self._layer_input(layer, tok, h), pos, layer)
            if li == 0:   # the entry's slot, filled a layer at a time (a layer's keys need the one below)
                k_all = k.new_zeros(len(layers), *k.shape[2:])
                v_all = v.new_zeros(len(layers), *v.shape[2:])
                cache.add(index, k_all, v_all, speculative)
            k_all[li], v_all[li] = k[0, 0], v[0, 0]
            kk, vv, visible = cache.keys(index, dev)
            out = attend(q, kk[None, :, li], vv[None, :, li], visible[None, None])
            h = self._finish(layer, out, h)
        return self.logits(h)[0, 0], h[0, 0]


def pool_glimpses(visual_states: torch.Tensor, visual_positions: torch.Tensor, n_glimpses: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pool the ivsb outputs at the visual positions [n_vis, H] (in sequence = temporal order)
    into min(G, n_vis) contiguous segments; segment i covers [floor(i*n/G), floor((i+1)*n/G)).
    Returns (pooled [G', H], position of each segment's first visual token [G'])."""
    n = visual_states.shape[0]
    if n == 0 or n_glimpses == 0:
        return visual_states.new_zeros(0, visual_states.shape[-1]), visual_positions.new_zeros(0)
    G = min(n_glimpses, n)
    bounds = [(i * n) // G for i in range(G + 1)]
    pooled = torch.stack([visual_states[bounds[i]:bounds[i + 1]].float().mean(0) for i in range(G)])
    return pooled, visual_positions[torch.tensor(bounds[:G], device=visual_positions.device)]
