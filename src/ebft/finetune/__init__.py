"""Block-wise repair methods, registered by name (``--finetune``)."""

from ebft.finetune import dsnot as _dsnot  # noqa: F401  (registers "dsnot")
from ebft.finetune import ebft as _ebft  # noqa: F401  (registers "ebft")
from ebft.finetune import ebft_mask as _ebft_mask  # noqa: F401  (registers "ebft-mask")
from ebft.finetune.base import FINETUNERS, BlockFinetuner, BlockResult, register_finetuner

__all__ = ["FINETUNERS", "BlockFinetuner", "BlockResult", "register_finetuner"]
