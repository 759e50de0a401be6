"""Tiny random-weight transformers models of several families, built from configs (no download)."""

from __future__ import annotations

import torch

#: sliding window of the families that have one (every test sequence runs well past it)
WINDOW = 4
VOCAB = 64

BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            eos_token_id=VOCAB - 1, bos_token_id=1, pad_token_id=0, tie_word_embeddings=False)

#: family -> config overrides; each exercises what its *ForCausalLM.forward does differently
FAMILIES = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"]),
    "gemma2": dict(head_dim=8, sliding_window=WINDOW, final_logit_softcapping=2.0,
                   attn_logit_softcapping=10.0, query_pre_attn_scalar=8,
                   layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(head_dim=8, sliding_window=WINDOW, final_logit_softcapping=2.0,
                        query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]),
    "granite": dict(logits_scaling=0.25, embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.2),
    "cohere": dict(logit_scale=4.0),
    "phi3": dict(sliding_window=WINDOW),
    "mistral": dict(sliding_window=WINDOW),
    "qwen3": dict(head_dim=8),
    "cohere2": dict(sliding_window=WINDOW, logit_scale=4.0),
    "granitemoe": dict(logits_scaling=0.25, num_local_experts=2, num_experts_per_tok=1),
    "starcoder2": dict(sliding_window=WINDOW),
    "olmo2": {},
    "exaone4": dict(sliding_window=WINDOW),
    # families whose configs use other argument names
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
}
#: families configured from scratch (not from ``BASE``)
RAW = {"gpt2", "gpt_neox", "falcon", "opt"}


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    if family in RAW:
        kw = dict(FAMILIES[family], vocab_size=VOCAB, eos_token_id=VOCAB - 1, bos_token_id=1, pad_token_id=0)
    else:
        kw = dict(BASE, **FAMILIES[family])
    kw.update(overrides)
    if "vocab_size" in overrides and "eos_token_id" not in overrides:
        kw["eos_token_id"] = overrides["vocab_size"] - 1
    config = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # random init leaves logits tiny; sharpen the head so post-processing matters
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def own_logprobs(model, sequences: list[list[int]]) -> torch.Tensor:
    """``log_softmax(model(ids).logits[:, -1])`` of each sequence on its own (the reference)."""
    rows = []
    with torch.no_grad():
        for seq in sequences:
            logits = model(torch.tensor([seq], device=model.device)).logits
            rows.append(torch.log_softmax(logits[0, -1].float(), dim=-1))
    return torch.stack(rows)


WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "and", "then", "it", "was", "red", "blue",
         "one", "two", "three", "user", "assistant"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}"
                 "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def tiny_tokenizer(add_bos: bool = True, order: list[str] | None = None):
    """An offline word-level tokenizer whose post-processor adds BOS (like Llama-2 / Gemma)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab_list = SPECIALS + (order if order is not None else WORDS)
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_vllm_llama(seed: int = 0, head_scale: float = 8.0, eos_bias: float = 0.0, **overrides):
    """A tiny Llama of vocabulary 8 (EOS 7) that vLLM's CPU backend runs (head_dim 32, which its
    CPU attention needs); the random head is sharpened by ``head_scale`` and EOS's logit raised by
    ``eos_bias`` (in units of a typical logit scale) so completions end inside short horizons."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=8, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=48, eos_token_id=7, bos_token_id=1, pad_token_id=0,
              tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw), dtype=torch.float32).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(head_scale)
        head[7] += eos_bias * head.norm(dim=1).mean() / head.shape[1] ** 0.5
    return model
