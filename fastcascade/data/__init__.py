"""fastcascade.data: AV1-style partition blocks for training cascades.

* :func:`label_blocks`: a rate-distortion proxy that labels (N, 1, 16, 16) luma blocks with an AV1
  partition type (libaom enum order; exactly symmetric under flips and transposes).
* :func:`load_partition_dataset`: the embedded dataset (scikit-image's photographs, split by image,
  cached on disk); ``python -m fastcascade.data`` builds it and prints the label distribution.
* Label-aware augmentation (:func:`random_dihedral`, :func:`hflip`, :func:`vflip`, :func:`transpose`,
  :func:`mixup`), the TTA label maps (``AV1_TTA_LABEL_MAPS``) and the cascade's stage targets
  (:func:`stage_targets`, :func:`labels_from_stages`, ``STAGE_CLASS_NAMES``).
* :func:`stage_table`: the research plan's stage table (Stage-1 F1 / precision / recall, Stage-2 macro F1,
  RECT F1, AB F1, final accuracy and macro F1) of final predictions, as a :class:`StageTable`;
  :func:`format_stage_table` prints designs beside the plan's v5 figures and v6 targets (``PLAN_REFERENCE``).
* :func:`av1_partition_cascade`: the seed hierarchy (Stage 1 -> Stage 2 -> RECT / AB ensemble) as a
  fastcascade.Cascade with named labels and branches.

This package is the AV1 partition domain: it builds on the generic layers (cascade, train, losses,
metrics, segmentation), none of which imports it.
* :func:`load_block_dataset` / :func:`save_block_dataset`: your own blocks in a documented .pt format.

scikit-image is imported only when the embedded dataset is built.
"""

from .augment import AV1_TTA_LABEL_MAPS, RandomDihedral, hflip, mixup, random_dihedral, transpose, vflip
from .blockfile import load_block_dataset, save_block_dataset
from .dataset import (
    IMAGES,
    TEST_IMAGES,
    VAL_IMAGES,
    PartitionDataset,
    build_partition_dataset,
    default_cache_dir,
    format_distribution,
    label_distribution,
    load_partition_dataset,
    tile_blocks,
)
from .hierarchy import av1_partition_cascade
from .labels import (
    BLOCK_SIZE,
    HFLIP_LABELS,
    HORZ,
    HORZ_4,
    HORZ_A,
    HORZ_B,
    IGNORE_INDEX,
    LABEL_NAMES,
    NONE,
    NUM_CLASSES,
    NUM_MAIN_CLASSES,
    PARTITION_RECTS,
    SPLIT,
    STAGE_CLASS_NAMES,
    STAGES,
    TRANSPOSE_LABELS,
    VERT,
    VERT_4,
    VERT_A,
    VERT_B,
    VFLIP_LABELS,
    labels_from_stages,
    partition_map,
    stage_targets,
)
from .partition import DEFAULT_QP, LABELLER_VERSION, label_blocks, labeller_params, qp_to_step
from .stage_table import PLAN_REFERENCE, StageTable, aggregate_stage_tables, format_stage_table, stage_table

__all__ = [
    "AV1_TTA_LABEL_MAPS", "BLOCK_SIZE", "DEFAULT_QP", "HFLIP_LABELS", "HORZ", "HORZ_4", "HORZ_A", "HORZ_B",
    "IGNORE_INDEX", "IMAGES", "LABELLER_VERSION", "LABEL_NAMES", "NONE", "NUM_CLASSES", "NUM_MAIN_CLASSES",
    "PARTITION_RECTS", "PLAN_REFERENCE", "SPLIT", "STAGES", "STAGE_CLASS_NAMES", "TEST_IMAGES",
    "TRANSPOSE_LABELS", "VAL_IMAGES", "VERT", "VERT_4", "VERT_A", "VERT_B", "VFLIP_LABELS",
    "PartitionDataset", "RandomDihedral", "StageTable", "aggregate_stage_tables", "av1_partition_cascade",
    "build_partition_dataset", "default_cache_dir", "format_distribution", "format_stage_table", "hflip",
    "label_blocks", "label_distribution", "labeller_params", "labels_from_stages", "load_block_dataset",
    "load_partition_dataset", "mixup", "partition_map", "qp_to_step", "random_dihedral", "save_block_dataset",
    "stage_table", "stage_targets", "tile_blocks", "transpose", "vflip",
]
