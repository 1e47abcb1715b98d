"""Tests of the transformers adapters on tiny random models built offline (no hub access)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tests.conftest import tiny_llama as conftest_llama
from tokenrl.lm.loading import check_same_vocabulary, load_causal_lm, usable_vocab_size
from tokenrl.lm.models import HFTeacher, decoder_layers, make_student, save_student
from tokenrl.core.teachers import Teacher

WORDS = "the a cat dog sat ran on under mat rug and then quickly slowly big small red blue".split()


def word_tokenizer(words: list[str] = WORDS, name: str = "tiny-words") -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<unk>", "<pad>", "<bos>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.name_or_path = name
    return tokenizer


def tiny_llama(vocab_rows: int, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    sizes = dict(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return conftest_llama(vocab_rows, seed, eos_token_id=3, pad_token_id=1, bos_token_id=2, **sizes).eval()


def tiny_gpt2(vocab_rows: int, layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_rows, n_embd=32, n_layer=layers, n_head=4, n_positions=64)).eval()


def random_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random tokens; padding is filled with junk ids to prove it is ignored."""
    generator = torch.Generator().manual_seed(seed)
    tokens_BT = torch.randint(4, vocab, (len(lengths), max(lengths)), generator=generator)
    return tokens_BT, torch.tensor(lengths)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(len(tokenizer))


def test_load_from_directory(tmp_path, tokenizer, llama):
    llama.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model, loaded_tokenizer = load_causal_lm(str(tmp_path / "m"))
    assert not model.training
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    tokens_BT = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(tokens_BT).logits, llama(tokens_BT).logits)


def test_missing_path_offline_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model.*HF_HUB_OFFLINE"):
        load_causal_lm(missing)


def _permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py), which the GGUF loader undoes."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(path: str, tied: bool = False) -> tuple[LlamaForCausalLM, list[str]]:
    """A float32 llama GGUF with a byte-level BPE tokenizer, and the model it was written from.

    ``tied``: the model ties its output embedding to the input one, and the file has no ``output.weight``
    (as SmolLM2's GGUF).
    """
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "Ġa", "<|endoftext|>"]
    eos = len(tokens) - 1
    n_layers, n_heads, n_kv_heads = 2, 4, 2
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
        tie_word_embeddings=tied, bos_token_id=eos, eos_token_id=eos,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    weights = {name: tensor.numpy() for name, tensor in model.state_dict().items()}

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(32 // n_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * eos + [3])  # 1 normal, 3 control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if not tied:
        writer.add_tensor("output.weight", weights["lm_head.weight"])
    block_names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for layer in range(n_layers):
        for hf_name, gguf_name in block_names.items():
            weight = weights[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute_for_gguf(weight, n_heads)
            elif gguf_name == "attn_k":
                weight = _permute_for_gguf(weight, n_kv_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokens


@pytest.mark.parametrize("how", ["directory+gguf_file", "direct .gguf path", "tied embeddings"])
def test_load_from_gguf(tmp_path, how):
    path = str(tmp_path / "tiny.gguf")
    reference, tokens = write_tiny_llama_gguf(path, tied=how == "tied embeddings")
    if how == "directory+gguf_file":
        model, tokenizer = load_causal_lm(str(tmp_path), gguf_file="tiny.gguf")
    else:
        model, tokenizer = load_causal_lm(path)
    assert len(tokenizer) == len(tokens)
    assert tokenizer.eos_token == "<|endoftext|>"
    # The meta-device load leaves no tensor behind on meta and no weight uninitialised: every parameter and
    # buffer (RoPE frequencies included) equals the model the file was written from.
    loaded = dict(model.named_parameters()) | dict(model.named_buffers())
    expected = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert tensor.device.type == "cpu", name
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    if how == "tied embeddings":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokens_BT = torch.tensor([tokenizer.encode(" the cat sat")])
    torch.testing.assert_close(model(tokens_BT).logits, reference(tokens_BT).logits)


def test_pruned_llama_student(tokenizer, llama):
    student, student_tokenizer = make_student("pruned", llama, tokenizer, keep_every=2)
    assert student_tokenizer is tokenizer
    # 4 blocks, stride 2: blocks 0, 2 and the last one (3).
    assert len(decoder_layers(student)) == 3 == student.config.num_hidden_layers
    assert [layer.self_attn.layer_idx for layer in decoder_layers(student)] == [0, 1, 2]
    assert len(decoder_layers(llama)) == 4, "the teacher must be left untouched"
    torch.testing.assert_close(student.get_input_embeddings().weight, llama.get_input_embeddings().weight)
    torch.testing.assert_close(decoder_layers(student)[1].mlp.up_proj.weight, decoder_layers(llama)[2].mlp.up_proj.weight)
    assert student.get_input_embeddings().weight.data_ptr() != llama.get_input_embeddings().weight.data_ptr()
    assert student.training
    tokens_BT, lengths_B = random_batch(len(tokenizer), [5, 3])
    teacher = HFTeacher(student, tokenizer)
    assert teacher.next_token_logits(tokens_BT, lengths_B).shape == (2, len(tokenizer))
    _assert_cache_matches(teacher, tokens_BT, lengths_B)


def test_pruned_keeps_per_layer_config_lists(tokenizer):
    teacher = tiny_llama(len(tokenizer), layers=5)
    teacher.config.layer_types = ["full_attention"] * 4 + ["sliding_attention"]
    student, _ = make_student("pruned", teacher, tokenizer, keep_every=3)
    assert student.config.num_hidden_layers == 3
    assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]


def test_pruned_gpt2_student(tokenizer):
    teacher = tiny_gpt2(len(tokenizer), layers=3)
    student, _ = make_student("pruned", teacher, tokenizer, keep_every=2)
    assert len(student.transformer.h) == 2 == student.config.n_layer
    tokens_BT = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(student(tokens_BT).logits).all()
    _assert_cache_matches(HFTeacher(student, tokenizer), *random_batch(len(tokenizer), [4, 2, 3]))


def test_fresh_student(tokenizer):
    student, student_tokenizer = make_student(
        "fresh", teacher_tokenizer=tokenizer, config_overrides={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2}
    )
    assert student_tokenizer is tokenizer
    assert student.config.vocab_size == len(tokenizer)
    assert student.config.num_hidden_layers == 2
    assert student(torch.tensor([[5, 6]])).logits.shape == (1, 2, len(tokenizer))


def test_vocabulary_mismatch_names_first_differing_token():
    teacher_tokenizer = word_tokenizer(name="teacher-tok")
    student_tokenizer = word_tokenizer(["the", "a", "bird", *WORDS[3:]], name="student-tok")
    with pytest.raises(ValueError, match=r"teacher-tok.*student-tok.*token id 6: 'cat' vs 'bird'"):
        check_same_vocabulary(teacher_tokenizer, student_tokenizer)
    check_same_vocabulary(teacher_tokenizer, word_tokenizer())


def test_vocabulary_mismatch_in_eos():
    other = word_tokenizer()
    other.eos_token = "<bos>"
    with pytest.raises(ValueError, match="EOS"):
        check_same_vocabulary(word_tokenizer(), other)


def test_padded_embedding_teacher_accepted(tokenizer):
    """Extra embedding rows (Qwen-style padding) are not actions: logits are sliced to len(tokenizer)."""
    padded = tiny_llama(len(tokenizer) + 12)
    assert usable_vocab_size(padded, tokenizer) == len(tokenizer)
    teacher = HFTeacher(padded, tokenizer)
    tokens_BT, lengths_B = random_batch(len(tokenizer), [4, 6])
    logits_BV = teacher.next_token_logits(tokens_BT, lengths_B)
    assert logits_BV.shape == (2, len(tokenizer))
    full_BV = padded(tokens_BT[:1, :4]).logits[:, -1]
    torch.testing.assert_close(logits_BV[:1], full_BV[:, : len(tokenizer)], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="output rows"):
        usable_vocab_size(tiny_llama(len(tokenizer) - 1), tokenizer)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_teacher_matches_unpadded_forward(tokenizer, family):
    model = tiny_llama(len(tokenizer)) if family == "llama" else tiny_gpt2(len(tokenizer))
    teacher = HFTeacher(model, tokenizer, max_batch=2)
    assert isinstance(teacher, Teacher)
    assert teacher.eos_token_id == tokenizer.eos_token_id
    lengths = [6, 2, 4, 1, 5]
    tokens_BT, lengths_B = random_batch(len(tokenizer), lengths)
    next_BV = teacher.next_token_logits(tokens_BT, lengths_B)
    sequence_BTV = teacher.sequence_logits(tokens_BT, lengths_B)
    assert next_BV.dtype == sequence_BTV.dtype == torch.float32
    assert sequence_BTV.shape == (len(lengths), max(lengths), len(tokenizer))
    with torch.no_grad():
        for b, length in enumerate(lengths):
            row_TV = model(tokens_BT[b : b + 1, :length]).logits[0]
            torch.testing.assert_close(next_BV[b], row_TV[-1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(sequence_BTV[b, :length], row_TV, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def _assert_cache_matches(teacher: HFTeacher, tokens_BT: torch.Tensor, lengths_B: torch.Tensor, steps: int = 4) -> None:
    """Lock-step cached generation (the teacher's KVCacheStepper) gives the logits of re-encoding every prefix."""
    generator = torch.Generator().manual_seed(1)
    logits_BV = teacher.stepper.start(tokens_BT, lengths_B)
    sequences = [tokens_BT[b, :length].tolist() for b, length in enumerate(lengths_B.tolist())]
    for step in range(steps + 1):
        width = max(map(len, sequences))
        padded_BT = torch.tensor([row + [0] * (width - len(row)) for row in sequences])
        uncached_BV = teacher.next_token_logits(padded_BT, torch.tensor([len(row) for row in sequences]))
        torch.testing.assert_close(logits_BV, uncached_BV, atol=1e-4, rtol=1e-4)
        if step == steps:
            break
        next_B = torch.randint(4, teacher.vocab_size, (len(sequences),), generator=generator)
        for row, token in zip(sequences, next_B.tolist()):
            row.append(token)
        logits_BV = teacher.stepper.advance(next_B)
    teacher.stepper.stop()


def test_kv_cache_path_matches_uncached(tokenizer, llama):
    teacher = HFTeacher(llama, tokenizer)
    _assert_cache_matches(teacher, *random_batch(len(tokenizer), [3, 7, 1, 5]), steps=6)
    with pytest.raises(RuntimeError, match="start"):
        teacher.stepper.advance(torch.tensor([5]))


def test_save_student_round_trip(tmp_path, tokenizer, llama):
    student, _ = make_student("pruned", llama, tokenizer, keep_every=2)
    out_dir = tmp_path / "student"
    save_student(student, tokenizer, str(out_dir))
    save_student(student, tokenizer, str(out_dir))  # overwriting an existing checkpoint works too
    assert sorted(os.listdir(tmp_path)) == ["student"], "no staging directories may be left behind"
    assert any(name.endswith(".safetensors") for name in os.listdir(out_dir))
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert reloaded.config.num_hidden_layers == 3
    tokens_BT = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens_BT).logits, student.eval()(tokens_BT).logits, atol=0, rtol=0)
    _, reloaded_tokenizer = load_causal_lm(str(out_dir))
    check_same_vocabulary(tokenizer, reloaded_tokenizer)
