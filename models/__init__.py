"""SiT models with the LSEP probe head: ``SiT_models`` maps a config name to its constructor;
``ModelConfig`` (models/config.py) is the one description of a model, stored in checkpoints.

Imported lazily, so ``models.vae`` / ``models.checkpoint`` load without timm (faster CLI start-up).
"""
__all__ = ["SIT_SIZES", "ModelConfig", "SiT", "SiT_models"]


def __getattr__(name):
    if name in ("SiT", "SiT_models"):
        from models import sit
        return getattr(sit, name)
    if name in ("SIT_SIZES", "ModelConfig"):
        from models import config
        return getattr(config, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
