"""Inference: KV-cache contexts, text decoding, the flow sampler with CFG, tasks and the CLI.

    context.py   the forward of a block over a context (cached attention, masks from batch.allowed),
                 prefill, run_block, add_text, add_image, encode_vae_tokens; re-exports the
                 names of the three modules below (the import path callers use)
    kv_cache.py  Context (batched per-layer KV cache + packed-sequence metadata), new_context,
                 shardings, concat_contexts / take_rows (CFG contexts), write_block
    prepared.py  prepare (the model split once, per-layer decoder modules, optionally placed on
                 a mesh), merge, backend_jit
    blocks.py    Block, BlockBuilder (items laid out by data.plans.item_tokens; a prompt's
                 data.plans.lay_out, the layout training's tokenize is built from, via
                 BlockBuilder.layout), make_builder, vit_patches
    text.py      generate_text (jitted while-loop decode; greedy without sampling ops /
                 temperature + top-p)
    image.py     generate_latents / generate_images (Euler flow sampler, three-context CFG batched
                 into one model call per step, renorm global / channel / text_channel),
                 step_velocity, decode_latents, cfg_combine
    runner.py    Program / Runner / run_programs: prompt items + generation steps, batched;
                 prompt_builders (each prompt laid out by data.plans.lay_out)
    tasks.py     vqa, report, image_to_text, text_to_image (think mode), edit (segmentation,
                 super-resolution, modality translation, staining, counterfactual); their
                 prompts written by the training template (data.plans.prompt_plan)
    loading.py   checkpoint + tokenizer loading with clear errors
    cli.py       `python -m unimedvl_jax.infer vqa|report|generate|edit --checkpoint DIR ...`
    random_init.py  random_model: a random UniMedVL built without compiling (tests, benchmarks)
"""
