"""Shared fixtures: a tiny transformers model with a locally trained tokenizer (nothing downloaded)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_text_config(tok, **kw) -> dict:
    """The sizes of every tiny transformers text model in the tests (hidden 32, 2 layers, 4 query and 2 key/value
    heads) with the tokenizer's vocabulary and special tokens; kw adds or overrides."""
    return dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


def build_hf_tiny(path, seed=0, **sizes):
    """Qwen2 config (hidden 32, 2 layers; sizes overrides) + a byte-level BPE tokenizer trained here on task-like
    text."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    corpus = [f"{a}+{b}={a + b} the answer is {a * b}" for a in range(40) for b in range(0, 40, 3)]
    corpus += ["user: hello assistant: hi there", "What is two plus two? Four."] * 20
    fast = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], corpus)
    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**tiny_text_config(fast, max_position_embeddings=256, tie_word_embeddings=True), **sizes})
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory):
    return build_hf_tiny(tmp_path_factory.mktemp("hf_tiny"))


def _bpe_tokenizer(specials, corpus=None):
    """A byte-level BPE (vocabulary 300) trained here on task-like text, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = corpus or [f"{a}+{b}={a + b}|{a + b} add: count box" for a in range(30) for b in range(30)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_hf_vlm(path, kind="qwen2_vl", seed=0, mrope_section=(1, 1, 2), **sizes):
    """A tiny transformers VLM from a config (Qwen2-VL or LLaVA with a Qwen2 text model), a locally trained
    BPE tokenizer and a PIL image processor: nothing downloaded. sizes overrides the text model's sizes
    (mrope_section: Qwen2-VL's rotary split, summing to head_dim / 2)."""
    torch.manual_seed(seed)
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    text.update(sizes)
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

        fast = _bpe_tokenizer(
            [
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|image_pad|>",
                "<|video_pad|>",
            ]
        )
        ids = {t: fast.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
        cfg = Qwen2VLConfig(
            text_config=dict(
                vocab_size=len(fast), rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)}, **text
            ),
            vision_config=dict(
                depth=1,
                embed_dim=32,
                hidden_size=32,
                num_heads=2,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
            ),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            eos_token_id=fast.eos_token_id,
            pad_token_id=fast.pad_token_id,
            bos_token_id=None,
            tie_word_embeddings=True,
        )
        model = Qwen2VLForConditionalGeneration(cfg)
        processor = Qwen2VLImageProcessorPil(
            min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
        )
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil

        fast = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"])
        cfg = LlavaConfig(
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            text_config=dict(model_type="qwen2", vocab_size=len(fast), **text),
            image_token_index=fast.convert_tokens_to_ids("<image>"),
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            tie_word_embeddings=True,
        )
        model = LlavaForConditionalGeneration(cfg)
        processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def hf_vlm_dir(tmp_path_factory):
    return build_hf_vlm(tmp_path_factory.mktemp("hf_vlm"))


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    return build_hf_vlm(tmp_path_factory.mktemp("llava"), kind="llava")
