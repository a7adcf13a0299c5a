"""A tiny Llama written as a GGUF file the way llama.cpp's converter writes one (importable by tests).

``write_llama_gguf`` stores a ``transformers`` ``LlamaForCausalLM`` under llama.cpp's tensor names, with the
query/key rows permuted as llama.cpp does (``transformers`` undoes it on load), the given tensors quantized
to Q8_0, and a byte-level BPE tokenizer as ``tokenizer.ggml.*`` metadata (``gpt2`` model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def byte_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts``; special tokens ``<unk> <s> </s> <|endoftext|>`` are 0 .. 3."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer Llama (d = 32, GQA 4/2, tied embeddings, eager attention) with random weights, eval mode."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config).eval()


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary row order for q/k (``convert_hf_to_gguf.LlamaModel.permute``)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(model, tokenizer: Tokenizer, path: Path, quantize: tuple[str, ...] = ("ffn_",)) -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``, tied embeddings) and ``tokenizer`` to ``path``; tensors whose GGUF
    name contains one of ``quantize`` are stored as Q8_0, the rest as F32."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    merges = tokenizer.to_str()
    import json

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if index < 4 else 1 for _, index in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in json.loads(merges)["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)

    tensors = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    for index, layer in enumerate(model.model.layers):
        for hf_name, gguf_name in LLAMA_NAMES.items():
            tensors[f"blk.{index}.{gguf_name}.weight"] = layer.get_submodule(hf_name).weight
    for name, tensor in tensors.items():
        array = tensor.detach().float().numpy()
        if ".attn_q." in name:
            array = _permute(array, cfg.num_attention_heads)
        elif ".attn_k." in name:
            array = _permute(array, cfg.num_key_value_heads)
        if any(q in name for q in quantize) and array.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
