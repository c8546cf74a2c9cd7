"""Dataset preparation for the bundles, and synthetic data.

Every preparer writes the same layout, read by the bundles through ``monai.data.load_decathlon_datalist``::

    <out>/images/<name>.png    <out>/labels/<name>.png    <out>/datalist.json (training / validation / test)

- :mod:`kd_components.data.common`: seeded file-name-based split, image/mask pairing, datalist writing, guarded
  output folder, :class:`DatasetError`;
- :mod:`kd_components.data.cli`: the command line every preparer shares (``--out``, ``--seed``, ``--fractions``,
  ``--overwrite``, ``--limit``, ``--max-size``) and its exit status;
- :mod:`kd_components.data.polyp`: Kvasir-SEG and CVC-ClinicDB (``python -m kd_components.data.polyp --help``);
- :mod:`kd_components.data.synthetic`: synthetic polyp-like data (``python -m kd_components.data.synthetic --help``);
- :mod:`kd_components.data.vessels`: DRIVE, CHASE_DB1, ARCADE (COCO) and XCAD, with ``<out>/fov/`` field-of-view
  masks (``python -m kd_components.data.vessels --help``);
- :mod:`kd_components.data.synthetic_vessels`: synthetic thin-vessel data
  (``python -m kd_components.data.synthetic_vessels --help``);
- :mod:`kd_components.data.pathology`: MoNuSeg 2018 (XML polygons rasterised) and generic H&E tiles
  (``python -m kd_components.data.pathology --help``);
- :mod:`kd_components.data.volumes`: ACDC and Synapse / BTCV as NIfTI volumes
  (``<out>/volumes/{images,labels}/<case>.nii.gz``, patient-level split) and their 2D slices as NPY
  (``python -m kd_components.data.volumes --help``);
- :mod:`kd_components.data.synthetic_volumes`: synthetic cardiac-MRI-like volumes in the SSL4MIS ACDC layout, raw
  input of :func:`kd_components.data.volumes.prepare_acdc_data`.
"""

from kd_components.data.common import (
    DATALIST_NAME,
    DEFAULT_FRACTIONS,
    IMAGES_DIR,
    LABELS_DIR,
    SPLIT_KEYS,
    DatasetError,
    DatasetWarning,
    check_output_dir,
    datalist_entries,
    list_files,
    pair_by_stem,
    save_png,
    split_counts,
    split_names,
    staged_output,
    validate_fractions,
    write_datalist,
)

_LAZY = {
    "prepare_polyp_data": "kd_components.data.polyp",
    "make_synthetic_polyps": "kd_components.data.synthetic",
    "synthetic_polyp_arrays": "kd_components.data.synthetic",
    "prepare_vessel_data": "kd_components.data.vessels",
    "make_synthetic_vessels": "kd_components.data.synthetic_vessels",
    "synthetic_vessel_arrays": "kd_components.data.synthetic_vessels",
    "prepare_pathology_data": "kd_components.data.pathology",
    "prepare_acdc_data": "kd_components.data.volumes",
    "prepare_synapse_data": "kd_components.data.volumes",
    "write_slices": "kd_components.data.volumes",
    "slice_datalist": "kd_components.data.volumes",
    "SelectSliced": "kd_components.data.volumes",
}


def __getattr__(name: str):
    """Import the preparers on first use, so ``python -m kd_components.data.polyp`` runs without a warning."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATALIST_NAME",
    "DEFAULT_FRACTIONS",
    "IMAGES_DIR",
    "LABELS_DIR",
    "SPLIT_KEYS",
    "DatasetError",
    "DatasetWarning",
    "SelectSliced",
    "check_output_dir",
    "datalist_entries",
    "list_files",
    "make_synthetic_polyps",
    "make_synthetic_vessels",
    "pair_by_stem",
    "prepare_acdc_data",
    "prepare_pathology_data",
    "prepare_polyp_data",
    "prepare_synapse_data",
    "prepare_vessel_data",
    "save_png",
    "slice_datalist",
    "split_counts",
    "split_names",
    "staged_output",
    "synthetic_polyp_arrays",
    "synthetic_vessel_arrays",
    "validate_fractions",
    "write_datalist",
    "write_slices",
]
