"""SiT models with the LSEP probe head: ``SiT_models`` maps a config name to its constructor.

Imported lazily, so ``models.vae`` / ``models.checkpoint`` load without timm (faster CLI start-up).
"""
__all__ = ["SIT_SIZES", "SiT", "SiT_models"]


def __getattr__(name):
    if name in __all__:
        from models import sit
        return getattr(sit, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
