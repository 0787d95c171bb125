"""A tiny teacher built inside the tests: a one-layer random-shaped LlamaForCausalLM whose weights make it a
character bigram model of a small Japanese corpus, with a character-level tokenizer and a chat template.

Why a bigram model and not random weights: the validators refuse output that is not in the template's
language or that fails the repetition filters, so a random model's output would (rightly) be refused
everywhere. With one-hot embeddings, zeroed attention/MLP outputs (the residual stream stays the current
token's one-hot vector) and lm_head = log P(next | current), sampling at temperature 1 draws from the corpus'
character bigrams: Japanese-looking text that passes the filters. The pipeline is what is tested, not prose.

`num_layers` / `intermediate_size` add real compute for benchmarks (benchmarks/generation_throughput.py):
the extra layers' query/key/value and MLP input weights stay random, so every matmul of a model of that
size runs, while their output projections (o_proj, down_proj) are zero and the text is still the bigram's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_teacher(out: Path, texts: list[str], num_layers: int = 1, intermediate_size: int = 8) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)) | set("".join(SPECIALS)))
    vocab = {t: i for i, t in enumerate(SPECIALS + [c for c in chars if c not in SPECIALS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=SPECIALS[4:])
    tok.chat_template = CHAT_TEMPLATE
    V = len(vocab)
    H = (V + 7) // 8 * 8
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False,
                      bos_token_id=2, eos_token_id=3, pad_token_id=1, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(cfg)
    counts = np.full((V, V), 0.0)
    n_special = len(SPECIALS)
    for t in texts:
        ids = [vocab[c] for c in t]
        np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
    unigram = counts.sum(axis=0) + 1e-3
    counts[:n_special] = unigram  # after a special token (the assistant marker): the unigram distribution
    counts[:, n_special:] += 1e-3  # smoothing over characters only: specials (and EOS) are never sampled
    with np.errstate(divide="ignore"):  # log 0 of the special tokens' columns, overwritten next
        logp = np.log(counts / counts.sum(axis=1, keepdims=True))
    logp[:, :n_special] = -30.0
    with torch.no_grad():
        for name, p in model.named_parameters():  # inner weights stay random: zero outputs make them inert
            if not name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                                  "up_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight[:, :V] = torch.eye(V)
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        # RMSNorm of a one-hot vector is sqrt(H) times it: scale lm_head so logits are exactly log P
        model.lm_head.weight[:, :V] = torch.tensor(logp.T / np.sqrt(H), dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
