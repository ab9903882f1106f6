"""What the Megatron-Core ranks import, imported once by the fork server they start from.

megatron-core takes ~5 s to import on this machine; a rank forked from a server that holds it
starts at once, where a spawned rank imported it again (each of the 2-4 ranks of each run). The
server runs no torch operation, so no thread pool exists when it forks.
"""

import importlib
import warnings

# megatron-core says so at import on a machine without TE / Apex; the CPU fallbacks are what we run
warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")

for module in ("torch.distributed", "megatron.core.dist_checkpointing", "megatron.core.parallel_state",
               "megatron.core.tensor_parallel", "megatron.core.distributed", "megatron.core.models.gpt",
               "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.optimizer",
               "megatron.core.transformer.multi_latent_attention", "megatron.core.transformer.moe.moe_utils"):
    importlib.import_module(module)
