"""The default models, untrained: the benchmark vocabulary, the word-level tokenizer with its
chat template, the family's processor and the randomly initialised model (``llava``: CLIP vision
tower + 2-layer projector + Llama decoder; ``idefics3``: SigLIP-style vision tower +
pixel-shuffle connector + Qwen2 decoder), and their parameter counts."""

from __future__ import annotations

import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.model.default_spec import FAMILIES, DefaultModelSpec
from pipeline.tasks.items import CANDIDATE_SLOT

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
# Idefics3's processor wraps the image tokens in these; they must be single tokens.
IDEFICS3_SPECIALS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
# A LLaVA-1.5-like single-turn template; words are in the vocabulary, so it tokenises exactly.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : "
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %} assistant : {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} </s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} assistant :{% endif %}"
)
TEMPLATE_WORDS = ("user", "assistant", ":", "yes", "no")


def benchmark_vocabulary(annotations: pd.DataFrame) -> list[str]:
    """Every word that the benchmark's prompts, answers and candidates use, sorted."""
    from tokenizers.pre_tokenizers import Punctuation, Sequence, WhitespaceSplit

    pre = Sequence([WhitespaceSplit(), Punctuation()])
    words: set[str] = set(TEMPLATE_WORDS)
    texts: list[str] = []
    for rec in annotations.itertuples():
        texts.append(rec.prompt.replace(CANDIDATE_SLOT, " "))
        texts.extend(rec.references)
        texts.extend(rec.candidates)
    for t in set(texts):
        words.update(w for w, _ in pre.pre_tokenize_str(t.lower()))
    return sorted(words)


def build_tokenizer(vocabulary: list[str], extra_specials: tuple[str, ...] = ()):
    """Word-level fast tokenizer (lower-cased, punctuation split) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(extra_specials)
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in vocabulary if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
        additional_special_tokens=list(extra_specials),
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, spec: DefaultModelSpec):
    """The family's own processor class over our tokenizer and a fixed-size image processor."""
    if spec.family == "idefics3":
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        image_processor = Idefics3ImageProcessorPil(
            do_image_splitting=False,
            size={"longest_edge": spec.image_size},
            max_image_size={"longest_edge": spec.image_size},
        )
        # Pixel shuffle with scale factor 2 merges 2x2 patches into one language-model token.
        seq_len = (spec.image_size // spec.patch_size) ** 2 // 4
        return Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE
        )
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=SPECIAL_TOKENS["image"],
    )


def build_model(tokenizer, spec: DefaultModelSpec) -> torch.nn.Module:
    """A randomly initialised model of ``spec.family``: LLaVA (CLIP vision tower + 2-layer projector +
    Llama decoder) or Idefics3 (``_build_idefics3``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if spec.family not in FAMILIES:
        raise PipelineError(f"default model family {spec.family!r} is not supported; allowed: {FAMILIES}")
    if spec.family == "idefics3":
        return _build_idefics3(tokenizer, spec)
    n_patches = (spec.image_size // spec.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_ffn,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        image_seq_length=n_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    # LLaVA's init draws every weight from N(0, 0.02), which leaves a from-scratch CLIP tower
    # unable to learn in our step budget (measured: OCR probe loss stays at log(66) for 300
    # steps); CLIP's own init learns. Pretrained LLaVAs never meet this: their tower is trained.
    model.model.vision_tower.load_state_dict(CLIPVisionModel(vision).state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _build_idefics3(tokenizer, spec: DefaultModelSpec) -> torch.nn.Module:
    """An Idefics3-style VLM: SigLIP-style tower (no class token, post-norm) + pixel-shuffle
    connector + a Qwen2 decoder (biased q/k/v, grouped-query attention): a second family that
    differs from LLaVA in vision encoder, connector and language model."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    vision = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_ffn,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text.to_dict(),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(spec.seed)
    model = Idefics3ForConditionalGeneration(config)
    # As for LLaVA: the composite model's N(0, 0.02) init stalls a from-scratch tower; SigLIP's own
    # init (same parameter names, minus SigLIP's pooling head) learns.
    siglip = SiglipVisionModel(SiglipVisionConfig(**vision)).state_dict()
    own = model.model.vision_model.state_dict()
    model.model.vision_model.load_state_dict({k: siglip[k] for k in own if k in siglip}, strict=False)
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, attr, getattr(tokenizer, attr))
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    lm = sum(p.numel() for p in model.get_decoder().parameters()) if hasattr(model, "get_decoder") else 0
    return {"total": int(total), "language_model": int(lm)}
