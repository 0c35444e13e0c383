"Tiny random Stable Diffusion components (diffusers' constructor arguments) shared by the pipeline-level parity tests."
import torch

def unet_cfg(in_channels:int=4): # 4: text-to-image; 8: InstructPix2Pix; 9: inpainting
    "A 2-level U-Net with cross-attention, SD 1.x's layout (1x1-conv proj_in/proj_out), on 4x4 latents."
    return dict(sample_size=4, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)

def vae_cfg(channels:int=3): # image channels: 3 (RGB) or 1 (MNIST)
    "A 3-level VAE: 16x16 images <-> 4x4x4 latents."
    return dict(in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=[8, 16, 16],
                layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                norm_num_groups=4, sample_size=16, scaling_factor=0.5)

UNET, VAE = unet_cfg(), vae_cfg()
SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             clip_sample=False, set_alpha_to_one=False, steps_offset=1)   # SD 1.x's DDIM settings
ATOL = dict(atol=2e-4, rtol=1e-4)   # minisd vs diffusers images: same maths, different kernels and op order

def gen(seed:int) -> torch.Generator: return torch.Generator().manual_seed(seed)

def save_diffusers_pipeline(folder, captions:list[str], seed:int=1):
    "A tiny random diffusers `StableDiffusionPipeline` (a CLIP tokenizer trained by minisd on `captions`) saved to `folder`."
    import diffusers, transformers
    from minisd.tokenizer import CLIPTokenizer
    tok = CLIPTokenizer.train(captions, vocab_size=600)
    tok.save_pretrained(f'{folder}/_tokenizer')
    torch.manual_seed(seed)
    te = transformers.CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    dp = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(**UNET), vae=diffusers.AutoencoderKL(**VAE),
        text_encoder=transformers.CLIPTextModel(te), tokenizer=transformers.CLIPTokenizer.from_pretrained(f'{folder}/_tokenizer'),
        scheduler=diffusers.DDIMScheduler(**SCHED), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    dp.save_pretrained(f'{folder}/pipe')
    return f'{folder}/pipe'

def load_both(folder):
    "A fresh (minisd, diffusers) pair of pipelines loaded from the same folder, progress bars off."
    import diffusers
    from minisd.pipeline import StableDiffusion
    pipe = StableDiffusion.from_pretrained(folder); pipe.set_progress_bar_config(disable=True)
    dp = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    dp.set_progress_bar_config(disable=True)
    return pipe, dp

def same_weights(ours_cls, ref_cls, cfg, seed:int=0, jitter:float=0.05):
    "(minisd model, diffusers model) built from the config `cfg` with the same random weights, eval mode."
    torch.manual_seed(seed)
    ref = ref_cls.from_config(cfg.to_dict()).eval()
    with torch.no_grad():   # jitter: layers diffusers initialises to zero (e.g. proj_out) must matter too
        for p in ref.parameters(): p.add_(torch.randn_like(p) * jitter)
    ours = ours_cls(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref
