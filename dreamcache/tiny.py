"""Tiny random models with the real architectures, for CI and laptops.

Each builder writes a model in the Hugging Face layout (config + safetensors + tokenizer/processor files)
so that the pipeline loads it through exactly the same ``from_pretrained`` calls as the real checkpoint.
Outputs are noise; every byte of plumbing is real. Models are built once per folder and reused: a folder
counts as built only when its ``.complete`` marker exists, so a build killed halfway is redone.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import torch

from dreamcache.store import atomic_folder

# The subfolder names double as the tiny profile's model "ids".
LLM, SDXL, DETECTOR, SEGMENTER, SD15, SD21, DINO, CLIP = ("llama", "sdxl", "grounding-dino", "sam", "sd15", "sd21", "dino",
                                                         "clip")
_MARKER = ".complete"


# Builders changed since their first version write to a new folder, so that cached copies are rebuilt.
REVISIONS = {LLM: 2,  # 2: byte-level BPE tokenizer (decodes to exactly the text generated, as real LLMs do)
             SDXL: 2}  # 2: SDXL's three-level U-Net, so the SDXL adapter layers exist


def default_dir() -> Path:
    """Where tiny models live: $DREAMCACHE_TINY_DIR, else ~/.cache/dreamcache/tiny-models."""
    env = os.environ.get("DREAMCACHE_TINY_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dreamcache" / "tiny-models"


def ensure_tiny_models(root: str | Path | None = None, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Builds whichever of the tiny models ``names`` (default: all) are missing under ``root`` and returns
    {name: local path}."""
    root = Path(root) if root else default_dir()
    builders = {LLM: _build_llm, SDXL: _build_sdxl, DETECTOR: _build_detector, SEGMENTER: _build_segmenter,
                SD15: _build_sd15, SD21: _build_sd21, DINO: _build_dino, CLIP: _build_clip}
    unknown = set(names or ()) - set(builders)
    if unknown:
        raise KeyError(f"no tiny model {', '.join(sorted(unknown))}; the tiny models are {', '.join(builders)}")
    paths = {}
    for name, build in builders.items():
        if names is not None and name not in names:
            continue
        path = root / (f"{name}-v{REVISIONS[name]}" if name in REVISIONS else name)  # a changed builder: new folder
        if not (path / _MARKER).exists():
            # Built in a private folder, then renamed: concurrent builders never see half a model, and the one
            # that lands second keeps the first's copy, as good as its own.
            with atomic_folder(path) as tmp:
                torch.manual_seed(0)
                build(Path(tmp))
                (Path(tmp) / _MARKER).write_text("ok\n")
        paths[name] = str(path)
    return paths


def _words() -> list[str]:
    """The words of the tiny text vocabularies (configs/tiny-words.txt: the caption vocabulary's, frozen)."""
    text = (Path(__file__).parent / "configs" / "tiny-words.txt").read_text()
    return [w for w in text.splitlines() if w and not w.startswith("#")]


def _build_llm(out: Path) -> None:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on the prompt vocabulary and the answer's JSON
    (as real Llama tokenizers are byte-level: any text encodes, and decoding gives back exactly the text the
    model generated) and a chat template; head_dim 64, as vLLM needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    answer = '[{"subject": "a red dog", "caption": "a red dog on a beach, in the style of a photograph"}]'
    corpus = _words() + [answer] * 8  # fixed text only: the tokenizer must not change when a prompt does
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)


def _clip_tokenizer(out: Path):
    """A character-level CLIP BPE tokenizer: every byte symbol and its end-of-word form, no merges."""
    from transformers import CLIPTokenizer

    # GPT-2's byte-to-symbol table: printable bytes stand for themselves, the rest map above U+0100.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {s: i for i, s in enumerate(["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(out)
    return tokenizer


def _build_sdxl(out: Path) -> None:
    """SDXL's pipeline (two CLIP text encoders, text-time U-Net, VAE, Euler) at toy width. The U-Net has SDXL's
    layout: no attention at the first level, then 1 and (in the mid block too) 2 transformer blocks per layer,
    three layers per decoder level, so every SDXL adapter layer exists."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = _clip_tokenizer(out / "_tok")
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=len(tok), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32))
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop ids x 8 + pooled text (32)
        cross_attention_dim=64, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out)
    shutil.rmtree(out / "_tok")


def _build_sd15(out: Path) -> None:
    """SD 1.5's pipeline layout (4 U-Net blocks, 3 transformers per decoder block, so the adapter layer names
    exist), CLIP text encoder, VAE and DDPM scheduler (epsilon prediction), at toy width."""
    _build_sd(out, prediction_type="epsilon", linear_projection=False, trained_like_vae=False)


def _build_sd21(out: Path) -> None:
    """SD 2.1's objective at toy width: v-prediction and linear projections in the transformers. Its VAE is
    made to behave like a trained one (a sharp posterior, latents scaled to unit variance), so that different
    images stay different in latent space: what a test of "the adapters learn from the reference" needs."""
    _build_sd(out, prediction_type="v_prediction", linear_projection=True, trained_like_vae=True)


def _build_sd(out: Path, prediction_type: str, linear_projection: bool, trained_like_vae: bool) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _clip_tokenizer(out / "_tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=77,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, sample_size=16, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=linear_projection)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    if trained_like_vae:
        c = vae.config.latent_channels
        with torch.no_grad():
            vae.quant_conv.weight[c:] = 0  # log-variance channels: a constant -12, std e^-6
            vae.quant_conv.bias[c:] = -12.0
            images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
            std = vae.encode(images).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=round(1 / std, 4))  # as SD's 0.18215 was chosen for its VAE
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, steps_offset=1, clip_sample=False)  # as SD's
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)
    shutil.rmtree(out / "_tok")


def _build_detector(out: Path) -> None:
    """Grounding DINO (Swin backbone, BERT text tower) with d_model 32 and two decoder layers."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil)

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + list(string.ascii_lowercase + string.digits + string.punctuation) + _words()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 128})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                   out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=37, max_position_embeddings=256),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, num_feature_levels=4,
        encoder_n_points=2, decoder_n_points=2, max_text_len=256,
    )
    GroundingDinoForObjectDetection(config).save_pretrained(out)


def _build_segmenter(out: Path) -> None:
    """SAM (ViT image encoder, prompt encoder, two-way mask decoder) on 256 px inputs."""
    from transformers import (SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor, SamPromptEncoderConfig,
                              SamVisionConfig)
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    size = 256
    image_processor = SamImageProcessorPil(size={"longest_edge": size}, pad_size={"height": size, "width": size},
                                           mask_size={"longest_edge": size // 4},
                                           mask_pad_size={"height": size // 4, "width": size // 4})
    SamProcessor(image_processor=image_processor).save_pretrained(out)
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                      output_channels=32, image_size=size, global_attn_indexes=[1],
                                      window_size=4, num_pos_feats=16),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=size,
                                                     image_embedding_size=size // 16, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                 iou_head_hidden_dim=32),
    )
    SamModel(config).save_pretrained(out)


def _build_dino(out: Path) -> None:
    """DINO ViT-S/16's layout (ViTModel, CLS token of the last layer) at 32 px, two layers."""
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16), add_pooling_layer=False).save_pretrained(out)


def _build_clip(out: Path) -> None:
    """CLIP ViT-B/32's layout (vision + text towers, projections) at 32 px, two layers each."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _clip_tokenizer(out / "_tok")
    CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(out)
    shutil.rmtree(out / "_tok")
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(text_config=dict(**tower, vocab_size=len(tok), max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(**tower, image_size=32, patch_size=16), projection_dim=16)
    CLIPModel(config).save_pretrained(out)


if __name__ == "__main__":
    print(json.dumps(ensure_tiny_models(), indent=2))
