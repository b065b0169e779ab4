"""SiT models with the LSEP probe head: ``SiT_models`` maps a config name to its constructor."""
from models.sit import SIT_SIZES, SiT, SiT_models

__all__ = ["SIT_SIZES", "SiT", "SiT_models"]
