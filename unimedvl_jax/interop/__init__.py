"""PyTorch / Hugging Face interop: the BAGEL / UniMedVL checkpoint layout (SPEC section 8).

    keymap        the exact bijection: our parameter paths <-> torch keys, per-tensor transforms,
                  `expected_torch_keys(cfg)` (1223 keys for the 7B config), strict key checks
    import_torch  torch dir (ema.safetensors, ae.safetensors, llm/vit_config.json) -> Orbax
    export_torch  Orbax -> torch dir; the understanding expert as a transformers causal LM
    st_io         streaming safetensors reading (safe_open) and writing (tensor by tensor)

CLI: `python -m unimedvl_jax.convert {import,export} ...`.
"""
