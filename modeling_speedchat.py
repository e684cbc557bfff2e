"""
modeling_speedchat.py: speedchat's GPT (train.py) for Hugging Face transformers. `engine.py export`
copies this file into the exported folder, whose config.json points at it (auto_map), so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

builds this model. It is self-contained (torch and transformers only: transformers loads it from the
folder, away from speedchat) and computes what train.GPT computes, line for line: rotary embeddings,
QK-norm, ReLU², sliding windows, value embeddings, the per-layer residual/x0 scalars, the logit softcap,
GQA. The weights have train.GPT's names. tests/test_hf.py checks the logits (fp32: within 1e-4) and
greedy generate() against speedchat's own.

generate() works with transformers' cache (a DynamicCache, or any Cache with update(k, v, layer) and
get_seq_length()): keys and values of every position are kept; each layer reads the last `window` of
them as train.attend does. A batch with padding (attention_mask with zeros, left or right) gets
positions counted over its real tokens, as generate() counts them.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5 names the cache `cache` (input and output), 4.x `past_key_values`: take either, return the installed one
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SpeedchatConfig(PretrainedConfig):
    """train.GPTConfig, plus the constants train.py keeps outside it (softcap, rotary base and reach, gate width)."""
    model_type = "speedchat"
    # the standard names some tools read (lm_eval, generate's cache), mapped onto ours
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head"}

    def __init__(self, vocab_size=32768, padded_vocab_size=None, sequence_len=2048, n_layer=12, n_head=6, n_kv_head=6,
                 n_embd=768, window_pattern="SSSL", logit_softcap=15.0, rope_base=10000.0, rope_context_mult=10,
                 ve_gate_channels=32, use_cache=True, **kwargs):
        self.vocab_size, self.sequence_len = vocab_size, sequence_len
        self.padded_vocab_size = padded_vocab_size or -(-vocab_size // 64) * 64
        self.n_layer, self.n_head, self.n_kv_head, self.n_embd = n_layer, n_head, n_kv_head, n_embd
        self.window_pattern, self.logit_softcap, self.rope_base = window_pattern, logit_softcap, rope_base
        self.rope_context_mult, self.ve_gate_channels = rope_context_mult, ve_gate_channels
        self.use_cache = use_cache  # a field of every config in transformers 4, of none in 5
        self.max_position_embeddings = rope_context_mult * sequence_len  # the longest input it can represent
        kwargs.setdefault("tie_word_embeddings", False)  # lm_head is untied from wte
        super().__init__(**kwargs)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def window_sizes(config):
    """Per layer, w: query i sees keys i-w+1..i. S = a quarter of the training length, L = all of it; last layer L."""
    short, full = max(1, config.sequence_len // 4), config.sequence_len
    pat = config.window_pattern.upper()
    sizes = [short if pat[i % len(pat)] == "S" else full for i in range(config.n_layer)]
    sizes[-1] = full
    return sizes


def has_value_embed(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2  # alternating layers, always the last


def rotary_table(length, head_dim, base):
    """(cos, sin), each (length, head_dim/2) fp32, computed in fp64 as train.rotary_table."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return freqs.cos().float(), freqs.sin().float()


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # parameter-free


def apply_rotary(x, cos, sin):
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def attend(q, k, v, window, padded=None):
    """train.attend: q (B, H, Tq, D) are the last Tq positions of k, v (B, Hkv, Tk, D). Without padding the
    same SDPA calls as speedchat's (so the numbers match); padded = (keep (B, Tk), qpos (B, Tq), kpos (B, Tk))
    masks pad keys and measures the window in positions. A pad query sees itself, so nothing turns NaN."""
    gqa = q.size(1) != k.size(1)
    Tq, Tk = q.size(2), k.size(2)
    if padded is not None:
        keep, qpos, kpos = padded
        qp, kp = qpos[:, None, :, None], kpos[:, None, None, :]
        qi = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        ki = torch.arange(Tk, device=q.device)[None, :]
        mask = (keep[:, None, None, :] & (ki <= qi) & (kp <= qp) & (qp - kp < window)) | (ki == qi)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    start = max(0, Tk - Tq - window + 1)  # keys older than every query's window
    k, v = k[:, :, start:], v[:, :, start:]
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if Tq == Tk and window >= Tq:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    qi = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    ki = torch.arange(start, Tk, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(ki <= qi) & (qi - ki < window), enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, hd = config.n_embd, config.head_dim
        self.c_q = nn.Linear(C, self.n_head * hd, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(self.n_head * hd, C, bias=False)
        self.ve_gate = nn.Linear(min(config.ve_gate_channels, C), self.n_kv_head, bias=False) if has_value_embed(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window, cache, padded):
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).view(B, T, nh, hd).transpose(1, 2)
        dt = q.dtype
        k = self.c_k(x).view(B, T, nkv, hd).transpose(1, 2)
        v = self.c_v(x).view(B, T, nkv, hd).transpose(1, 2)
        if ve is not None:  # v += gate * value_embedding(token), gate in (0, 2)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.transpose(1, 2).unsqueeze(-1) * ve.view(B, T, nkv, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = norm(q).to(dt), norm(k).to(dt), v.to(dt)  # QK-norm
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = attend(q, k, v, window, padded)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, cache, padded):
        x = x + self.attn(norm(x), ve, cos, sin, window, cache, padded)
        return x + self.mlp(norm(x))


class SpeedchatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SpeedchatConfig
    base_model_prefix = "speedchat"  # no separate base model: the blocks live here, under train.GPT's names
    _no_split_modules = ["Block"]
    _tied_weights_keys = None

    def __init__(self, config):
        super().__init__(config)
        V, C, L = config.padded_vocab_size, config.n_embd, config.n_layer
        self.window_sizes = window_sizes(config)
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(L)])
        self.lm_head = nn.Linear(C, V, bias=False)
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(L) if has_value_embed(i, L)})
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.full((L,), 0.1))
        self._rotary = {}  # device -> (cos, sin): made on first use, fp32 whatever the weights' dtype (not a buffer)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors; a fresh model is trained in speedchat, not here

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def rotary(self, device):
        if device not in self._rotary:
            cos, sin = rotary_table(self.config.max_position_embeddings, self.config.head_dim, self.config.rope_base)
            self._rotary[device] = cos.to(device), sin.to(device)
        return self._rotary[device]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        """input_ids (B, T) -> logits (B, T, vocab_size) fp32, as train.GPT.forward; labels (B, T): the mean
        next-token loss (transformers' convention: shifted here, -100 ignored)."""
        B, T = input_ids.shape
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            from transformers import DynamicCache
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        padded = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            keep = attention_mask[:, -(past + T):].bool()  # (B, past + T): every key's row
            kpos = (keep.long().cumsum(-1) - 1).clamp(min=0)
            padded = (keep, kpos[:, -T:], kpos)
            pos = kpos[:, -T:]
        elif position_ids is not None:
            pos = position_ids.expand(B, T)
        else:
            pos = None
        if past + T > self.config.max_position_embeddings or (pos is not None and int(pos.max()) >= self.config.max_position_embeddings):
            raise ValueError(f"{past + T} tokens is longer than the model can represent: {self.config.max_position_embeddings} positions")
        cos, sin = self.rotary(input_ids.device)
        if pos is None:  # the plain case, as speedchat slices its tables
            cos, sin = cos[None, None, past:past + T], sin[None, None, past:past + T]
        else:
            cos, sin = cos[pos][:, None], sin[pos][:, None]  # (B, 1, T, hd/2)
        x = norm(self.wte(input_ids))
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i], cache, padded)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(norm(x))[..., :self.config.vocab_size]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})


SpeedchatConfig.register_for_auto_class()
SpeedchatForCausalLM.register_for_auto_class("AutoModelForCausalLM")
