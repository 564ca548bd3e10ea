"""Tiny random-initialised vision-language models, with working processors, for tests.

Each factory returns ``(model, processor)``: a model of the real transformers class for its
family, with a 2-layer language model, 4 query heads, hidden size 32-64, a 1-2 layer vision
tower on 16-32 pixel images, and a processor built from the family's own processor and PIL
image-processor classes around a tiny word-level tokenizer (no download anywhere).

Every family's processor is its real class with its real image (and, where it has one, video)
processor, so ``save_pretrained`` + ``AutoProcessor.from_pretrained`` round-trips it as a real
checkpoint does.

``add_words`` teaches a factory's tokenizer more words (the benchmark's, say).
``llava_with_opt_text`` is a VLM whose decoder layout the adapter does not know.
``tiny_phi`` is a text-only decoder with a plain (fc1 -> act -> fc2) MLP, for the non-gated path.
``make_images``, ``PROMPTS`` and ``ANSWERS`` are shared test data.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Words the prompts and answers of the tests use; anything else maps to <unk>.
WORDS = (
    "what what's is the colour color of shape in this image picture answer with one word "
    "red green blue yellow purple orange circle square triangle diamond left middle right "
    "a an word written box text caption describe does candidate correctly yes no exactly "
    "cat dog sun map key cup hat pen car there are two three shapes and on it user assistant "
    "question : . , ? ! ' - \" 0 1 2 3 4 5 6 7 8 9"
).split()


def _tokenizer(
    specials: list[str],
    *,
    chat_template: str | None,
    named: dict[str, str],
    extra_words: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials first (id 0 = first special), then WORDS.

    ``named`` maps attribute names (bos_token, eos_token, pad_token, image_token, ...) to
    tokens; the model-specific ones become tokenizer attributes (``tokenizer.image_token``,
    ``tokenizer.image_token_id``) as the real processors expect.
    """
    vocab: dict[str, int] = {}
    for tok in list(specials) + list(WORDS) + list(extra_words):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        chat_template=chat_template,
        **named,
    )
    # Registering them as special keeps the Whitespace pre-tokenizer from splitting them.
    tok.add_special_tokens(
        {"additional_special_tokens": [s for s in specials if s != "<unk>"]}, replace_extra_special_tokens=True
    )
    tok.padding_side = "left"
    return tok


def _template(user_start: str, image: str, user_end: str, assistant_start: str, bos: str = "") -> str:
    """A one-turn-per-message Jinja chat template in the shape of the families' real ones."""
    return (
        bos + "{% for message in messages %}"
        "{% if message['role'] == 'user' %}" + user_start + "{% else %}" + assistant_start + "{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image + "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% if message['role'] == 'user' %}" + user_end + "{% else %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}" + assistant_start + "{% endif %}"
    )


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    # Greedy decoding without warnings about sampling defaults or a missing pad token.
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.do_sample = False
        gc.temperature = None
        gc.top_p = None
        gc.top_k = None
    return model


def _llama_text(vocab: int, **kw: Any) -> dict[str, Any]:
    cfg = dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    cfg.update(kw)
    return cfg


# ---------------------------------------------------------------------------------------------
# LLaVA: CLIP vision + Llama text (GQA: 4 query heads, 2 key/value heads)
# ---------------------------------------------------------------------------------------------
def tiny_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER", "ASSISTANT"]
    tok = _tokenizer(
        specials,
        chat_template=_template("USER: ", "<image>\n", " ", "ASSISTANT:"),
        named=dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", image_token="<image>"),
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=_llama_text(len(tok)),
        image_token_index=image_id,
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    _seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    ip = LlavaImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return _finish(model), proc


# ---------------------------------------------------------------------------------------------
# Qwen2-VL and Qwen2.5-VL: their own vision towers (which also have MLPs), M-RoPE text model
# ---------------------------------------------------------------------------------------------
_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "user",
    "assistant",
]


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer(
        _QWEN_SPECIALS,
        chat_template=_template(
            "<|im_start|>user\n",
            "<|vision_start|><|image_pad|><|vision_end|>",
            "<|im_end|>\n",
            "<|im_start|>assistant\n",
        ),
        named=dict(
            pad_token="<|endoftext|>", eos_token="<|im_end|>", image_token="<|image_pad|>", video_token="<|video_pad|>"
        ),
    )


def _qwen_text(vocab: int, tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    # head_dim 16 -> 8 rotary frequencies split over (time, height, width).
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0},
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )


def _qwen_processor(processor_cls, tok):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # patch 4, merge 2: a 16x16 image is 4x4 patches -> 4 image tokens.
    size = {"shortest_edge": 8 * 8, "longest_edge": 32 * 32}
    ip = Qwen2VLImageProcessorPil(size=size, patch_size=4, temporal_patch_size=2, merge_size=2)
    vp = Qwen2VLVideoProcessor(size=size, patch_size=4, temporal_patch_size=2, merge_size=2)
    return processor_cls(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)


def tiny_qwen2_vl(seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = _qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config=_qwen_text(len(tok), tok),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    _seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    return _finish(model), _qwen_processor(Qwen2VLProcessor, tok)


def tiny_qwen2_5_vl(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = _qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text(len(tok), tok),
        # Its vision blocks are gated MLPs with gate/up/down projections, like the text layers.
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    _seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    return _finish(model), _qwen_processor(Qwen2_5_VLProcessor, tok)


# ---------------------------------------------------------------------------------------------
# Idefics3 and SmolVLM: SigLIP-like vision, pixel-shuffle connector, Llama text
# ---------------------------------------------------------------------------------------------
_IDEFICS_SPECIALS = [
    "<pad>",
    "<unk>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    "User",
    "Assistant",
]


def _idefics_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer(
        _IDEFICS_SPECIALS,
        chat_template=_template("User:", "<image>", "<end_of_utterance>\n", "Assistant:", bos="<|begin_of_text|>"),
        named=dict(pad_token="<pad>", bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>"),
    )


def _idefics_config(config_cls, tok):
    ids = tok.convert_tokens_to_ids
    # image 16, patch 4 -> 16 patches; scale factor 2 -> 4 image tokens.
    return config_cls(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        text_config=_llama_text(
            len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
        ),
        image_token_id=ids("<image>"),
        scale_factor=2,
    )


def tiny_idefics3(seed: int = 0):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = _idefics_tokenizer()
    cfg = _idefics_config(Idefics3Config, tok)
    _seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    ip = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 16}, max_image_size={"longest_edge": 16}
    )
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    return _finish(model), proc


def tiny_smolvlm(seed: int = 0):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    tok = _idefics_tokenizer()
    cfg = _idefics_config(SmolVLMConfig, tok)
    _seed(seed)
    model = SmolVLMForConditionalGeneration(cfg)
    size = {"longest_edge": 16}
    ip = SmolVLMImageProcessorPil(do_image_splitting=False, size=size, max_image_size=size)
    vp = SmolVLMVideoProcessor(size=size, max_image_size=size)
    proc = SmolVLMProcessor(
        image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_len=4, chat_template=tok.chat_template
    )
    return _finish(model), proc


# ---------------------------------------------------------------------------------------------
# PaliGemma: SigLIP + Gemma, no chat template, prefix-LM attention (token_type_ids)
# ---------------------------------------------------------------------------------------------
def tiny_paligemma(seed: int = 0):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = _tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        chat_template=None,
        named=dict(pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", image_token="<image>"),
    )
    ip = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    ip.image_seq_length = 16
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds 1152 <loc>/<seg> tokens
    cfg = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="gemma",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vocab_size=len(tok),
        projection_dim=32,
        hidden_size=32,
    )
    _seed(seed)
    return _finish(PaliGemmaForConditionalGeneration(cfg)), proc


# ---------------------------------------------------------------------------------------------
# Gemma3: SigLIP + pooled projector, Gemma3 text with sliding-window layers
# ---------------------------------------------------------------------------------------------
def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
        "model",
    ]
    tok = _tokenizer(
        specials,
        chat_template=_template(
            "<start_of_turn>user\n",
            "<start_of_image>",
            "<end_of_turn>\n",
            "<start_of_turn>model\n",
            bos="{{ bos_token }}",
        ),
        named=dict(
            pad_token="<pad>",
            bos_token="<bos>",
            eos_token="<eos>",
            boi_token="<start_of_image>",
            eoi_token="<end_of_image>",
            image_token="<image_soft_token>",
        ),
    )
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3Config(
        text_config=dict(
            model_type="gemma3_text",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        # image 16, patch 4 -> 4x4 patches pooled to 2x2 = 4 image tokens.
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    _seed(seed)
    model = Gemma3ForConditionalGeneration(cfg)
    ip = Gemma3ImageProcessorPil(size={"height": 16, "width": 16}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template, image_seq_length=4)
    return _finish(model), proc


# ---------------------------------------------------------------------------------------------
# InternVL: InternViT + pixel-shuffle projector + Qwen2 text
# ---------------------------------------------------------------------------------------------
def tiny_internvl(seed: int = 0):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = [
        "<|endoftext|>",
        "<unk>",
        "<|im_start|>",
        "<|im_end|>",
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<video>",
        "user",
        "assistant",
    ]
    tok = _tokenizer(
        specials,
        chat_template=_template("<|im_start|>user\n", "<IMG_CONTEXT>\n", "<|im_end|>\n", "<|im_start|>assistant\n"),
        named=dict(
            pad_token="<|endoftext|>",
            eos_token="<|im_end|>",
            start_image_token="<img>",
            end_image_token="</img>",
            context_image_token="<IMG_CONTEXT>",
            video_token="<video>",
        ),
    )
    cfg = InternVLConfig(
        # image 16, patch 4 -> 4x4 patches, pixel shuffle 0.5 -> 4 image tokens.
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=[16, 16],
            patch_size=[4, 4],
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    _seed(seed)
    model = InternVLForConditionalGeneration(cfg)
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    ip = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=False, max_patches=1)
    vp = InternVLVideoProcessor(size={"height": 16, "width": 16})
    proc = InternVLProcessor(
        image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=4, chat_template=tok.chat_template
    )
    return _finish(model), proc


# ---------------------------------------------------------------------------------------------
# Mistral3: Pixtral vision + Mistral text; PixtralProcessor lays out [IMG] rows with [IMG_BREAK]
# ---------------------------------------------------------------------------------------------
def tiny_mistral3(seed: int = 0):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    specials = ["<pad>", "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = _tokenizer(
        specials,
        chat_template=_template("[INST]", "[IMG]", "[/INST]", "", bos="<s>"),
        named=dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>"),
    )
    ids = tok.convert_tokens_to_ids
    cfg = Mistral3Config(
        vision_config=dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=16,
            image_size=16,
            patch_size=4,
        ),
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=ids("[IMG]"),
        spatial_merge_size=2,
    )
    _seed(seed)
    model = Mistral3ForConditionalGeneration(cfg)
    # patch 4, merge 2: a 16x16 image is 4x4 patches -> 2 rows of 2 image tokens (+ a break / end each).
    ip = PixtralImageProcessorPil(size={"longest_edge": 16}, patch_size={"height": 4, "width": 4})
    proc = PixtralProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        spatial_merge_size=2,
        chat_template=tok.chat_template,
        image_token="[IMG]",
        image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]",
    )
    return _finish(model), proc


def add_words(model: torch.nn.Module, processor: Any, words: list[str]) -> None:
    """Teach the word-level tokenizer of ``processor`` the ``words`` it lacks (as whole words)
    and grow ``model``'s embeddings to match: a random model then reads every benchmark word."""
    from tokenizers import AddedToken

    tok = getattr(processor, "tokenizer", processor)
    known = tok.get_vocab()
    tok.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in dict.fromkeys(words) if w not in known])
    model.resize_token_embeddings(len(tok), mean_resizing=False)


def llava_with_opt_text(seed: int = 0):
    """A LLaVA whose language model is OPT (its layers under ``.decoder``, the FFN not in an
    ``mlp`` module): transformers builds it, the adapter cannot find its decoder layers. No processor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, OPTConfig

    text = OPTConfig(
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        ffn_dim=32,
        word_embed_proj_dim=16,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        text_config=text.to_dict(),
        tie_word_embeddings=False,
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=8,
        ),
    )
    _seed(seed)
    return LlavaForConditionalGeneration(cfg)


FACTORIES: dict[str, Callable[..., tuple[torch.nn.Module, Any]]] = {
    "llava": tiny_llava,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
    "paligemma": tiny_paligemma,
    "gemma3": tiny_gemma3,
    "internvl": tiny_internvl,
    "mistral3": tiny_mistral3,
}

_BUILT: dict[str, tuple[torch.nn.Module, Any]] = {}


def built(family: str) -> tuple[torch.nn.Module, Any]:
    """(model, processor) of ``FACTORIES[family]``, built once per test process (seed 0)."""
    if family not in _BUILT:
        _BUILT[family] = FACTORIES[family]()
    return _BUILT[family]


def cached_adapter(family: str):
    """An adapter over ``built(family)``'s model (adapters are cheap; the model is shared)."""
    from pipeline.model.adapter import ModelAdapter

    return ModelAdapter.from_model(*built(family))


def tiny_phi(seed: int = 0):
    """A text-only decoder with a plain MLP (fc1 -> act -> fc2) and ``dense`` output projection."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    _seed(seed)
    return _finish(PhiForCausalLM(cfg)), None


def make_images(n: int, seed: int = 0) -> list:
    """n small RGB PIL images of varied sizes (16-24 px) and random content."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    sizes = [(16, 16), (20, 16), (16, 24), (24, 20)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        out.append(Image.fromarray(pixels.numpy()))
    return out


# Prompts of different lengths, so that rows are padded differently.
PROMPTS = [
    "what is the colour of the shape in the image ?",
    "what is written ?",
    "describe the image",
    "what shape is on the left ?",
]
ANSWERS = ["red circle", "cat", "a blue square and a red circle", "triangle"]


# Families whose processor can be built here (build_inputs is tested on these): all of them.
WITH_PROCESSOR = tuple(FACTORIES)
