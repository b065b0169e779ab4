"""ImageNet -> PNGs -> SD-VAE latents for LSEP training; the CLI is preprocessing/dataset_tools.py."""
