"""IHE AI Results conformance of what ``classify``, ``report`` and ``study`` write, end to end.

One study folder of real images (pydicom-data's chest CR, a DX made from its other CR, two CT
slices from pydicom's CT, pydicom's MR) goes through the three commands with the tiny random
models; every SR, SEG and Parametric Map they write is then checked by both PixelMed validators
(IHE Connectathon's; one JVM for the whole batch) and by dciodvfy, and the AIR creator rules that
a validator cannot see are checked on the same files (Contributing Equipment = TID 1004/4019
identity, tracking identifiers on every group, SEG algorithm identification).

PixelMed 20220618 (Debian's) has two limits that ``tests/pixelmed.known_pixelmed_defects`` names
exactly, so that anything else fails (docs/dicom-conformance.md, "Validator findings"): a
contradiction in its rules for a SEG without plane geometry (a projection radiograph's), and no
Parametric Map IOD (dciodvfy checks those).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from medgemma_deploy.cli.main import main
from tests.support.ct_slices import stacked_slices
from tests.support.dciodvfy import requires_dciodvfy, run_dciodvfy
from tests.support.inputs import PACKAGED_LABELS, read_testdata
from tests.support.label_sets import label_set_document, sct_finding
from tests.support.pixelmed import assert_pixelmed_clean, requires_pixelmed

pytestmark = [
    # pydicom-data's images carry one-component de-identified names; highdicom warns when copying them.
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning"),
]


#: An MR label set, because the packaged ones classify CR/DX (chest), CT and XC/OT only.
MR_LABELS = label_set_document(
    "mr-test",
    ["MR"],
    [
        sct_finding("mass", "Mass", "4147007", "an mr slice showing a mass", "an mr slice with no mass"),
        sct_finding("edema", "Edema", "267038008", "an mr slice showing edema", "an mr slice without edema"),
    ],
    description="Test findings on MR slices",
)


def _with_new_uids(dataset: pydicom.Dataset, tag: str) -> pydicom.Dataset:
    derived = copy.deepcopy(dataset)
    derived.StudyInstanceUID = generate_uid(entropy_srcs=["air study", tag])
    derived.SeriesInstanceUID = generate_uid(entropy_srcs=["air series", tag])
    derived.SOPInstanceUID = generate_uid(entropy_srcs=["air instance", tag])
    derived.file_meta.MediaStorageSOPInstanceUID = derived.SOPInstanceUID
    return derived


@pytest.fixture(scope="module")
def air_study(tmp_path_factory) -> Path:
    """CR, DX, CT (2 slices) and MR files from real test images, one series each."""
    folder = tmp_path_factory.mktemp("air-study")
    _, cr = read_testdata("RG1_UNCI.dcm")
    cr.save_as(folder / "cr.dcm")
    _, other_cr = read_testdata("RG3_UNCR.dcm")
    dx = _with_new_uids(other_cr, "dx")
    dx.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    dx.file_meta.MediaStorageSOPClassUID = dx.SOPClassUID
    dx.Modality = "DX"
    dx.BodyPartExamined = "CHEST"  # so that the chest label set applies, as for the CR
    dx.PresentationIntentType = "FOR PRESENTATION"
    dx.save_as(folder / "dx.dcm")
    _, ct = read_testdata("CT_small.dcm")
    for index, ct_slice in enumerate(stacked_slices(_with_new_uids(ct, "ct"), 2, "air ct slice")):
        ct_slice.save_as(folder / f"ct{index}.dcm")
    _, mr = read_testdata("MR_small.dcm")
    _with_new_uids(mr, "mr").save_as(folder / "mr.dcm")
    return folder


@pytest.fixture(scope="module")
def label_args(tmp_path_factory) -> list[str]:
    mr_labels = tmp_path_factory.mktemp("labels") / "mr.yaml"
    mr_labels.write_text(yaml.safe_dump(MR_LABELS))
    files = [PACKAGED_LABELS / "chest_xray.yaml", PACKAGED_LABELS / "ct.yaml", mr_labels]
    return [argument for path in files for argument in ("--labels", str(path))]


@pytest.fixture(scope="module")
def runs(air_study, label_args, tiny_models_root, tmp_path_factory) -> dict[str, tuple[int, Path, dict]]:
    """command -> (exit code, output folder, results.json) for classify, report and study."""
    done = {}
    for command in ("classify", "report", "study"):
        out = tmp_path_factory.mktemp(f"air-{command}")
        argv = [command, "-i", str(air_study), "-o", str(out), "-m", str(tiny_models_root)]
        if command != "report":
            argv += label_args
        if command != "classify":
            argv += ["--max-new-tokens", "8", "--quiet-tokens"]
        code = main(argv)
        done[command] = (code, out, json.loads((out / "results.json").read_text()))
    return done


def _dicom_outputs(runs) -> list[tuple[str, dict, Path]]:
    """(command, results.json output entry, path) of every DICOM object the three runs wrote."""
    found = []
    for command, (_, out, results) in runs.items():
        for output in results["outputs"]:
            if output["kind"] in ("SR", "SEG", "PMAP", "REPORT-SR"):
                found.append((command, output, out / output["path"]))
    return found


def _modality_of(runs, command: str, output: dict) -> str:
    results = runs[command][2]
    (series,) = [
        entry
        for entry in results["series"]
        if entry["series_instance_uid"] == output["source_series_instance_uid"]
    ]
    return series["modality"]


def test_every_modality_gets_its_objects_and_the_impossible_ones_are_named(runs):
    for command, (code, _, results) in runs.items():
        assert code == 0, (command, results["rejected"])
        kinds: dict[str, set[str]] = {}
        for output in results["outputs"]:
            if output["kind"] != "EMBEDDINGS":
                kinds.setdefault(_modality_of(runs, command, output), set()).add(output["kind"])
        findings = {"SR", "SEG"} if command != "report" else set()
        report = {"REPORT-SR"} if command != "classify" else set()
        for modality in ("CR", "DX"):
            assert kinds[modality] == findings | report, (command, modality)
        for modality in ("CT", "MR"):
            expected = findings | report | ({"PMAP"} if findings else set())
            assert kinds[modality] == expected, (command, modality)
        if command != "report":
            # A projection radiograph cannot carry a Parametric Map: named, with the reason.
            skipped = [entry for entry in results["skipped"] if entry.get("stage") == "pmap"]
            assert len(skipped) == 2, results["skipped"]
            for entry in skipped:
                assert "Frame of Reference" in entry["reason"] and "Parametric Map" in entry["reason"]


@requires_pixelmed
def test_pixelmed_finds_no_errors_in_any_object(runs):
    outputs = _dicom_outputs(runs)
    reports = assert_pixelmed_clean([path for _, _, path in outputs])
    for (_, output, _), report in zip(outputs, reports, strict=True):
        expected = "DicomSRValidator" if output["kind"] in ("SR", "REPORT-SR") else "DicomInstanceValidator"
        assert report.validator == expected


@requires_dciodvfy
def test_dciodvfy_finds_no_errors_in_any_object(runs):
    problems = [
        f"{command} {output['kind']} {path.name}: {errors}"
        for command, output, path in _dicom_outputs(runs)
        if (errors := run_dciodvfy(path))
    ]
    assert not problems, "\n".join(problems)


def test_every_object_names_the_model_as_processing_equipment_like_its_sr(runs):
    outputs = _dicom_outputs(runs)
    sr_identity = {}
    for _, output, path in outputs:
        if output["kind"] in ("SR", "REPORT-SR"):
            dataset = pydicom.dcmread(path)
            sr_identity[(output["kind"], output["sop_instance_uid"])] = _tid_1004_and_4019(dataset)
    assert sr_identity
    for _, output, path in outputs:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        equipment = _our_equipment(dataset)
        purpose = equipment.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "109102",
            "DCM",
            "Processing Equipment",
        )
        assert equipment.Manufacturer and equipment.ManufacturerModelName and equipment.DeviceUID
        if output["kind"] in ("SR", "REPORT-SR"):
            identity = sr_identity[(output["kind"], output["sop_instance_uid"])]
            assert equipment.DeviceUID == identity["observer_uid"]
            assert equipment.Manufacturer == identity["manufacturer"]
            assert equipment.ManufacturerModelName == identity["model_name"] == identity["algorithm_name"]
            assert equipment.SoftwareVersions[0] == identity["algorithm_version"]
    # The SEG/PMAP of a series name the same device as the findings SR of that series.
    findings_devices = {
        output["source_series_instance_uid"]: _our_equipment(pydicom.dcmread(path)).DeviceUID
        for _, output, path in outputs
        if output["kind"] == "SR"
    }
    for _, output, path in outputs:
        if output["kind"] in ("SEG", "PMAP"):
            equipment = _our_equipment(pydicom.dcmread(path, stop_before_pixels=True))
            assert equipment.DeviceUID == findings_devices[output["source_series_instance_uid"]]


def _our_equipment(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """Our Contributing Equipment item: the one with a Device UID (highdicom adds the source's
    acquisition equipment and itself as further items, without one)."""
    (equipment,) = [item for item in dataset.ContributingEquipmentSequence if "DeviceUID" in item]
    return equipment


def _tid_1004_and_4019(dataset: pydicom.Dataset) -> dict[str, str]:
    """Device observer (TID 1004) and first algorithm identification (TID 4019) values of an SR."""
    found: dict[str, str] = {}
    names = {
        "121012": "observer_uid",
        "121014": "manufacturer",
        "121015": "model_name",
        "111001": "algorithm_name",
        "111003": "algorithm_version",
    }

    def walk(items):
        for item in items:
            key = names.get(str(item.ConceptNameCodeSequence[0].CodeValue))
            if key is not None and key not in found:
                found[key] = str(item.UID if item.ValueType == "UIDREF" else item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(dataset.ContentSequence)
    assert set(found) == set(names.values()), found
    return found


def test_every_measurement_group_is_tracked(runs):
    for _, output, path in _dicom_outputs(runs):
        if output["kind"] != "SR":
            continue
        dataset = pydicom.dcmread(path)
        (measurements,) = [
            item for item in dataset.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
        ]
        groups = measurements.ContentSequence
        assert groups
        for group in groups:
            codes = [str(item.ConceptNameCodeSequence[0].CodeValue) for item in group.ContentSequence]
            assert codes.count("112039") == 1 and codes.count("112040") == 1, codes


def test_tracking_uids_survive_a_rerun_with_another_relevance_format(
    runs, air_study, label_args, tiny_models_root, tmp_path
):
    """The same finding of the same series keeps its Tracking UID across runs (AIR longitudinal tracking)."""
    _, first_out, first = runs["classify"]
    code = main(
        ["classify", "-i", str(air_study), "-o", str(tmp_path), "-m", str(tiny_models_root),
         "--relevance-format", "seg", *label_args]
    )  # fmt: skip
    assert code == 0
    second = json.loads((tmp_path / "results.json").read_text())

    def tracking(out, results):
        uids = {}
        for output in results["outputs"]:
            if output["kind"] == "SR":
                for item in _content_items(pydicom.dcmread(out / output["path"])):
                    if item.ConceptNameCodeSequence[0].CodeValue == "112040":
                        uids.setdefault(output["source_series_instance_uid"], set()).add(str(item.UID))
        return uids

    before, after = tracking(first_out, first), tracking(tmp_path, second)
    assert before and before == after
    assert not any(output["kind"] == "PMAP" for output in second["outputs"])


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_seg_segments_identify_their_algorithm_completely(runs):
    for _, output, path in _dicom_outputs(runs):
        if output["kind"] != "SEG":
            continue
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        for segment in dataset.SegmentSequence:
            assert segment.SegmentAlgorithmType == "AUTOMATIC"
            assert segment.SegmentAlgorithmName == "medgemma-deploy/tiny-random-medsiglip"
            (identification,) = segment.SegmentationAlgorithmIdentificationSequence
            assert identification.AlgorithmName == segment.SegmentAlgorithmName
            assert identification.AlgorithmVersion
            assert identification.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
            assert identification.AlgorithmSource == "medgemma-deploy"
            assert "software=medgemma-deploy" in identification.AlgorithmParameters
            assert segment.TrackingUID and segment.TrackingID


def test_findings_sr_references_each_map_it_wrote(runs):
    _, out, results = runs["classify"]
    written = {
        output["sop_instance_uid"]: output
        for output in results["outputs"]
        if output["kind"] in ("SEG", "PMAP")
    }
    referenced = set()
    for output in results["outputs"]:
        if output["kind"] == "SR":
            for item in _content_items(pydicom.dcmread(out / output["path"])):
                if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "125201":
                    referenced.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    # Every PMAP is referenced (one per finding); SEGs are referenced by every finding they hold.
    assert {uid for uid, output in written.items() if output["kind"] == "PMAP"} <= referenced
    assert {uid for uid, output in written.items() if output["kind"] == "SEG"} <= referenced
    assert referenced <= set(written)
