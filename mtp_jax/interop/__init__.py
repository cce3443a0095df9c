"""Hugging Face interop: the parameter tree <-> safetensors in Llama / DeepSeek-V3 naming.

Pure conversion only (no workdir, no training): `hf` maps parameters and configs,
`safetensors_io` reads and writes (sharded) safetensors directories. The entry points
(`mtp-export`, `mtp-import`) and `init.from_hf` sit above it.
"""
