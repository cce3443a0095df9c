"""Inference: cached decoding and self-speculative decoding with the MTP depths as drafter.

```
from mtp_jax.inference import generate, speculative_generate
res = speculative_generate(model, params, prompts [B, P], lengths [B], max_new_tokens=64)
res.tokens [B, 64], res.num_generated [B], res.stats['acceptance'], res.stats['mean_accepted']
```
"""

from mtp_jax.inference.acceptance import simulated_acceptance
from mtp_jax.inference.decode import DecodeResult, Sampler, generate
from mtp_jax.inference.speculative import speculative_generate

__all__ = ["DecodeResult", "Sampler", "generate", "simulated_acceptance", "speculative_generate"]
