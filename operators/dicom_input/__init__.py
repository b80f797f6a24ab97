"""DICOM input: files or folders → typed studies, series and display-ready frames.

:mod:`.reader` walks the input and groups it by study and series, :mod:`.pixels` decodes and checks
pixel data, :mod:`.voi` applies the Modality/VOI LUT and windows, :mod:`.operator` is the MONAI
Deploy study loader.
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "TOMOGRAPHIC_MODALITIES": "reader",
    "is_image_sop_class": "reader",
    "load_study_input": "reader",
    "DECODED_BYTES_PER_SAMPLE": "pixels",
    "MAX_DIMENSION": "pixels",
    "MAX_FRAMES": "pixels",
    "MAX_MODALITY_MAGNITUDE": "pixels",
    "PIXEL_DATA_KEYWORDS": "pixels",
    "SUPPORTED_PHOTOMETRIC_INTERPRETATIONS": "pixels",
    "MemoryBudget": "pixels",
    "check_budget": "pixels",
    "check_pixel_module": "pixels",
    "render_frames": "pixels",
    "CT_BODY_PART_WINDOWS": "voi",
    "CT_DEFAULT_WINDOWS": "voi",
    "apply_window": "voi",
    "ct_default_window": "voi",
    "frame_view": "voi",
    "scale_to_unit": "voi",
    "voi_display": "voi",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
