"""Per-class statistics of a predicted case, as TotalSegmentator's ``--statistics`` reports them.

For every class of the plan: the voxel count, the volume in millilitres and, per input channel, the mean
of the scan's own voxel values inside the class (the file's values after its scaling: Hounsfield units
for CT, whatever the network was fed after normalisation). The label map lies on the scan's grid, so
no resampling is involved. A class that was not predicted has volume 0 and mean ``null``.
"""

from __future__ import annotations

import numpy as np

from medseg_jax.data.volume import Volume

STATISTICS_SUFFIX = ".statistics.json"  # {case}.statistics.json beside {case}.nii.gz


def intensity_unit(channel_name: str, scheme: dict) -> str:
    """``"HU"`` for a CT channel (named CT, or normalised as CT / with an HU window), else ``"file values"``."""
    is_ct = channel_name.strip().upper() == "CT" or scheme.get("scheme") in ("ct", "hu_window")
    return "HU" if is_ct else "file values"


def case_statistics(label: np.ndarray, images: list[Volume], plan: dict, voxel_ml: float) -> dict:
    """Statistics of one case: ``label`` (the predicted label map on the scan's grid), ``images`` (one
    volume per channel in the plan's order, the scan as read), ``voxel_ml`` (one voxel's volume in mL).

    Means are accumulated in float64 from the file's values, so they do not depend on the voxel order.
    """
    names = list(plan["channel_names"])
    num_classes = int(plan["num_classes"])
    flat = label.ravel()
    counts = np.bincount(flat, minlength=num_classes)
    sums = [np.bincount(flat, weights=v.array.ravel().astype(np.float64), minlength=num_classes) for v in images]
    classes = {}
    for name, value in sorted(plan["labels"].items(), key=lambda item: item[1]):
        voxels = int(counts[value])
        classes[name] = {
            "label": int(value),
            "voxels": voxels,
            "volume_ml": voxels * voxel_ml,
            "mean_intensity": {
                channel: (float(total[value] / voxels) if voxels else None) for channel, total in zip(names, sums)
            },
        }
    return {
        "voxel_volume_ml": voxel_ml,
        "intensity_units": {
            channel: intensity_unit(channel, scheme) for channel, scheme in zip(names, plan["normalization"])
        },
        "classes": classes,
    }
