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
