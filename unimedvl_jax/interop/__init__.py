"""PyTorch / Hugging Face interop: the BAGEL / UniMedVL checkpoint layout (SPEC section 8).

    keymap        the exact bijection: our parameter paths <-> torch keys, per-tensor transforms,
                  `expected_torch_keys(cfg)` (1223 keys for the 7B config), strict key checks
    import_torch  torch dir (ema.safetensors or a sharded index, ae.safetensors, llm/vit_config.json)
                  -> Orbax, no config needed: reads the folder, writes the checkpoint
    import_config   the imported model's config, derived from the JSON configs and tensor shapes;
                  the base config and its `--set` overrides
    import_stream   the tensors streamed into the model's nnx.State (strict keys, one at a time)
    vae_checkpoint  a lone ae.safetensors -> a VAE checkpoint (import, save, load, as a source)
    import_common   what the import's parts share: file names, TorchImportError, ImportReport
    export_torch  Orbax -> torch dir (one file or transformers-style shards); the understanding
                  expert as a transformers causal LM
    st_io         streaming safetensors reading (checked headers, memory-mapped) and writing
                  (tensor by tensor), shard planning
    measure_memory  the host memory of import / export (are they streaming?)
    hf_loaders    the towers from their own upstream layouts: HF SigLIP vision, FLUX autoencoder
                  state dicts -> SiglipViT / AutoEncoder parameters (load_pure_dict)

CLI: `python -m unimedvl_jax.convert {import,export} ...`.
"""
