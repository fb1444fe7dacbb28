"""The embedded default dataset: procedurally drawn medical-style images with exact ground truth.

    python -m unimedvl_jax.data.synthetic --out DIR [--seed 0] [--size 64] [--n-subjects 2400]

writes, deterministically (same bytes for the same arguments), a dataset in the UniMed-5M JSONL
format (SPEC section 6). The default (2400 subjects, 64 px: 12.6K train / 0.7K val / 1.2K test
samples, 67 MB) takes ~16 s of CPU time; the cost grows with size^2 (256 px: ~10x). Layout:

    DIR/manifest.json                 counts per split / group / task, generator version, seed, ...
    DIR/tokenizer.model               SentencePiece model trained on all the text (vocab <= 1000)
    DIR/{train,val,test}/{group}.jsonl
    DIR/images/{split}/*.png          synthetic images (size x size; low-res inputs size/2)
    DIR/real/*                        real sample files shipped in installed packages (DICOM from
                                      pydicom / pydicom-data, NIfTI from nibabel, PNG/JPEG from
                                      scikit-image), copied byte for byte, format kept
Image paths in the JSONL are relative to DIR (the data root).

Groups (contract with the curriculum configs) and their task types (main_task_type /
sub_task_type):
    vqa      understanding / vqa                 closed yes/no and open questions, one-word answers
    report   understanding / report_generation   "Findings: ... Impression: ..."
    caption  understanding / caption             descriptions + modality recognition, incl. real
                                                 DICOM / NIfTI / photographs (captions from tags)
    t2i      image_generation / text_to_image    description -> image
    edit     image_generation / segmentation | super_resolution | modality_translation |
             virtual_staining | counterfactual   (counterfactual: input, instruction, target,
                                                 then the explanation text)

Each synthetic subject (one patient, one modality) has 0-3 lesions, at most one per image
quadrant, each small or large, round or oval (geometry in `truth.py`). Modality styles: CT
(abdomen), MRI T1 / T2 (brain; the same subject in both for modality translation), chest X-ray,
colour fundus, histology H&E / IHC (the same tissue in both for virtual staining), ultrasound.
Every record carries `meta` with the subject id, modality and exact findings, so
`truth.check_generated` and `truth.findings_from_meta` can score generated images and reports.
Splits never share a subject. Per subject: 2 VQA, 1 report, 1 caption, 1 text-to-image and 1 edit
sample.

Modules: common.py (names, splits, groups), draw.py (subjects, anatomy, rendering), texts.py
(descriptions, reports, questions, instructions), real.py (the real sample files), writer.py
(records, JSONL, tokenizer, manifest, `ensure_dataset`), cli.py (the command line). Everything
public is importable from `unimedvl_jax.data.synthetic`.
"""

from __future__ import annotations

from unimedvl_jax.data.synthetic.common import (DATASET_NAME, EDIT_TASKS, GENERATOR,
                                                GENERATOR_VERSION, GROUP_TASKS, GROUPS, MODALITIES,
                                                REAL_DATASET_NAME, SPLITS, VQA_SUFFIX, img_entry)
from unimedvl_jax.data.synthetic.draw import (FAMILY, draw_subject, make_anatomy, make_findings,
                                              make_subject, render, render_mask, seeded_rng)
from unimedvl_jax.data.synthetic.texts import (MODALITY_INFO, P_NO_LESION, describe, edit_texts,
                                               pick, report_text, vqa_question)
from unimedvl_jax.data.synthetic.real import DICOM_MODALITY, REAL_FILES, real_records, real_sources
from unimedvl_jax.data.synthetic.writer import (default_root, ensure_dataset, generate,
                                                split_sizes)
from unimedvl_jax.data.synthetic.cli import main

__all__ = [
    'DATASET_NAME', 'DICOM_MODALITY', 'EDIT_TASKS', 'FAMILY', 'GENERATOR', 'GENERATOR_VERSION',
    'GROUPS', 'GROUP_TASKS', 'MODALITIES', 'MODALITY_INFO', 'P_NO_LESION', 'REAL_DATASET_NAME',
    'REAL_FILES', 'SPLITS', 'VQA_SUFFIX', 'default_root', 'describe', 'draw_subject',
    'edit_texts', 'ensure_dataset', 'generate', 'img_entry', 'main', 'make_anatomy',
    'make_findings', 'make_subject', 'pick', 'real_records', 'real_sources', 'render',
    'render_mask', 'report_text', 'seeded_rng', 'split_sizes', 'vqa_question',
]
