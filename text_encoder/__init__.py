"""Text encoders: open_clip CLIP text towers for SD 1.x (ViT-L/14), SD 2.x (ViT-H/14) and SDXL (ViT-L/14 + bigG/14).

    ids = tokenize(prompts, pad_id=PAD_OPENAI)                # (B, 77)
    enc = ClipTextEncoder(TextEncoderConfig.sd1())
    enc.load_state_dict(keys.hf_to_ours(hf_state_dict))
    hidden, pooled = enc(ids)                                 # (B, 77, 768), None

    sdxl = SDXLTextEncoders()                                 # SDXLTextConfig() defaults to the published sizes
    context, pooled = sdxl.encode(prompts)                    # (B, 77, 2048), (B, 1280)
"""
from text_encoder import keys
from text_encoder.encoder import ClipTextEncoder, TextEncoderConfig
from text_encoder.sdxl import SDXLTextConfig, SDXLTextEncoders
from text_encoder.tokenizer import (
    CONTEXT_LENGTH,
    EOT_ID,
    PAD_OPENAI,
    PAD_OPENCLIP,
    SOT_ID,
    VOCAB_SIZE,
    decode,
    encode,
    tokenize,
)

__all__ = [
    "CONTEXT_LENGTH",
    "EOT_ID",
    "PAD_OPENAI",
    "PAD_OPENCLIP",
    "SOT_ID",
    "VOCAB_SIZE",
    "ClipTextEncoder",
    "SDXLTextConfig",
    "SDXLTextEncoders",
    "TextEncoderConfig",
    "decode",
    "encode",
    "keys",
    "tokenize",
]
from text_encoder import component  # noqa: E402,F401  registers the "text" component (ldm/components.py)

# Emphasis syntax and long prompts as AUTOMATIC1111's webui handles them (text_encoder.emphasis, .prompts).
from text_encoder.emphasis import BREAK, parse_emphasis  # noqa: E402
from text_encoder.prompts import (  # noqa: E402
    apply_emphasis,
    chunk_prompt,
    encode_prompts,
    encode_prompts_sdxl,
    tokenize_weighted,
)

__all__ += [
    "BREAK",
    "apply_emphasis",
    "chunk_prompt",
    "encode_prompts",
    "encode_prompts_sdxl",
    "parse_emphasis",
    "tokenize_weighted",
]
