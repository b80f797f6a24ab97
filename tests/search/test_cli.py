"""``index``, ``search`` and ``classify --index`` end to end on the tiny models and real DICOM files.

By construction: the frames of an indexed study come back first when searched ``--like``
themselves, and a row planted with the text tower's embedding of a query comes back first for that
query (the random tiny model knows nothing of radiology, so only such planted neighbours are
predictable).
"""

import json
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medgemma_deploy.cli.main import main
from medgemma_deploy.dev.synthetic import DEMO_PATIENT_ID, DEMO_PATIENT_NAME, write_demo_study
from medgemma_deploy.model_dir import model_identity
from medgemma_deploy.search.records import IndexRecord
from medgemma_deploy.search.store import open_store
from tests.support.demo_index import index_demo_study
from tests.support.search import fresh_database, running_postgres

QUERY = "a chest x-ray with a right pneumothorax"


@pytest.fixture(scope="module")
def indexed(tiny_models_root, tmp_path_factory):
    return index_demo_study(tiny_models_root, tmp_path_factory.mktemp("search"))


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory):
    """The demo study, not indexed: for the commands that index it themselves."""
    folder = tmp_path_factory.mktemp("study")
    return folder, write_demo_study(folder)


def search_json(capsys, url, models, *args):
    capsys.readouterr()
    code = main(["search", *args, "--store", url, "-m", str(models), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def classify_into_index(folder, out, models, store):
    """``classify --index`` of ``folder`` into ``store``; returns the exit status."""
    classify = ["classify", "-i", str(folder), "-o", str(out), "-m", str(models)]
    return main([*classify, "--index", "--store", store])


def error_line(err):
    """The one error line of a refused command (INFO lines from model loading may precede it)."""
    lines = [line for line in err.splitlines() if line.startswith("medgemma-deploy: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_index_writes_one_row_per_frame_and_records_it(indexed):
    url, files, results = indexed.url, indexed.files, indexed.results
    with open_store(url) as store:
        ((name, _, rows),) = store.models()
    assert rows == len(files)  # the CR plus six CT slices, one frame each
    assert name == "medgemma-deploy/tiny-random-medsiglip"
    assert all(series["index"]["indexed"] for series in results["series"])
    assert sum(series["index"]["rows"] for series in results["series"]) == len(files)


@pytest.mark.parametrize("position", [0, 3])
def test_search_like_an_indexed_image_returns_it_first(indexed, tiny_models_root, capsys, position):
    url, files = indexed.url, indexed.files
    example = files[position]
    source = pydicom.dcmread(example, stop_before_pixels=True)
    document = search_json(capsys, url, tiny_models_root, "--like", str(example), "--top", "3")
    first = document["hits"][0]
    assert first["sop_instance_uid"] == source.SOPInstanceUID
    assert first["series_instance_uid"] == source.SeriesInstanceUID
    assert first["study_instance_uid"] == source.StudyInstanceUID
    assert first["frame_number"] == 1
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(document["hits"]) == 3


def test_text_search_returns_the_planted_neighbour_first(indexed, tiny_models_root, capsys, tmp_path):
    db = indexed.database
    from medgemma_deploy.operators.medsiglip.runner import MedSigLIPRunner

    copy = tmp_path / "planted.db"
    shutil.copy(db, copy)
    planted_url = f"sqlite:///{copy}"
    with MedSigLIPRunner(tiny_models_root / "medsiglip", device="cpu") as runner:
        vector = runner.embed_texts([QUERY])[0]
        identity = runner.identity
    with open_store(planted_url) as store:
        store.add(
            [
                IndexRecord(
                    embedding=vector,
                    model_name=identity.name,
                    model_version=identity.version,
                    study_instance_uid="1.2.826.0.1.3680043.10.1",
                    series_instance_uid="1.2.826.0.1.3680043.10.1.1",
                    sop_instance_uid="1.2.826.0.1.3680043.10.1.1.1",
                    frame_number=1,
                    modality="CR",
                )
            ]
        )
    document = search_json(capsys, planted_url, tiny_models_root, QUERY)
    assert document["hits"][0]["sop_instance_uid"] == "1.2.826.0.1.3680043.10.1.1.1"
    assert document["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert document["model"] == {"name": identity.name, "version": identity.version}


def test_modality_and_finding_filters(indexed, tiny_models_root, capsys):
    url, files = indexed.url, indexed.files
    ct = search_json(capsys, url, tiny_models_root, "--like", str(files[0]), "--modality", "CT")
    assert {hit["modality"] for hit in ct["hits"]} == {"CT"}
    assert len(ct["hits"]) == len(files) - 1
    everything = search_json(capsys, url, tiny_models_root, QUERY, "--top", "50")
    key = next(iter(everything["hits"][0]["findings"]))
    threshold = sorted(hit["findings"].get(key, 0.0) for hit in everything["hits"])[-2]
    filtered = search_json(capsys, url, tiny_models_root, QUERY, "--finding", f"{key}>={threshold}")
    assert filtered["hits"] and all(hit["findings"][key] >= threshold - 1e-6 for hit in filtered["hits"])
    assert len(filtered["hits"]) < len(everything["hits"])


def test_table_output_lists_uids(indexed, tiny_models_root, capsys):
    url, files = indexed.url, indexed.files
    capsys.readouterr()
    assert (
        main(["search", "--like", str(files[0]), "--store", url, "-m", str(tiny_models_root), "--top", "2"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["#", "score"]
    assert pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID in lines[1]
    assert len(lines) == 3


def test_the_index_holds_no_patient_identifiers(indexed):
    db, files = indexed.database, indexed.files
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    content = db.read_bytes()
    for wal in db.parent.glob("index.db-*"):
        content += wal.read_bytes()
    assert source.StudyInstanceUID.encode() in content  # the grep itself works
    for identifier in (DEMO_PATIENT_NAME, DEMO_PATIENT_ID, str(source.AccessionNumber)):
        assert identifier and identifier.encode() not in content, identifier


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([""], "search text is empty"),
        ([], "either a search text or --like"),
        ([QUERY, "--like", "x.dcm"], "either a search text or --like"),
        ([QUERY, "--finding", "no_such_finding>=0.5"], "unknown finding filter no_such_finding"),
        ([QUERY, "--finding", "pneumothorax"], "KEY>=PROBABILITY"),
        ([QUERY, "--date-from", "2024"], "YYYYMMDD"),
        ([QUERY, "--top", "0"], "--top"),
    ],
)
def test_bad_queries_are_usage_errors(indexed, tiny_models_root, capsys, args, message):
    url = indexed.url
    capsys.readouterr()
    assert main(["search", *args, "--store", url, "-m", str(tiny_models_root)]) == 2
    assert message in error_line(capsys.readouterr().err)


def test_an_unknown_option_is_a_usage_error(indexed, tiny_models_root, capsys):
    url = indexed.url
    with pytest.raises(SystemExit) as raised:
        main(["search", QUERY, "--store", url, "-m", str(tiny_models_root), "--color", "red"])
    assert raised.value.code == 2
    assert "--color" in capsys.readouterr().err


def test_a_like_file_that_is_not_an_image_names_the_file(indexed, tiny_models_root, capsys, tmp_path):
    url = indexed.url
    bogus = tmp_path / "notes.dcm"
    bogus.write_text("not dicom")
    assert main(["search", "--like", str(bogus), "--store", url, "-m", str(tiny_models_root)]) == 2
    assert "notes.dcm" in error_line(capsys.readouterr().err)


def test_an_index_of_another_model_version_is_refused_naming_both(
    indexed, tiny_models_root, tmp_path, capsys
):
    url = indexed.url
    from medgemma_deploy.dev.testmodels.siglip import make_test_medsiglip

    other = make_test_medsiglip(tmp_path / "other", seed=1)
    loaded, indexed_version = (
        model_identity(other).version,
        model_identity(tiny_models_root / "medsiglip").version,
    )
    assert loaded != indexed_version
    capsys.readouterr()
    assert main(["search", QUERY, "--store", url, "-m", str(other)]) == 2
    err = error_line(capsys.readouterr().err)
    assert loaded in err and indexed_version in err


def test_an_unreachable_store_is_one_line_naming_it(tiny_models_root, capsys):
    url = "postgresql://reader@127.0.0.1:1/archive"
    assert main(["search", QUERY, "--store", url, "-m", str(tiny_models_root)]) == 2
    assert "127.0.0.1:1/archive" in error_line(capsys.readouterr().err)


def test_classify_with_index_indexes_what_it_classified(demo_study, tiny_models_root, tmp_path):
    folder, files = demo_study
    url = f"sqlite:///{tmp_path / 'index.db'}"
    out = tmp_path / "out"
    code = classify_into_index(folder, out, tiny_models_root, url)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert all(series["index"]["indexed"] for series in results["series"])
    assert not list(out.glob("embeddings-*.npy"))  # embeddings kept for the index, not written
    with open_store(url) as store:
        assert store.models()[0][2] == len(files)
        hits = store.search(
            np.ones(embedding_dim(tiny_models_root), np.float32),
            model_name=store.models()[0][0],
            model_version=store.models()[0][1],
            top=50,
        )
    assert any(hit.has_overlay for hit in hits)  # relevance maps made it to the page overlays


def embedding_dim(models_root):
    config = json.loads((models_root / "medsiglip" / "config.json").read_text())
    return int(config["vision_config"]["hidden_size"])


def test_a_study_whose_classification_failed_is_not_indexed(demo_study, tiny_models_root, tmp_path):
    folder, files = demo_study
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    # An MR series in the same study: no packaged label set applies, so its classification fails.
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.StudyInstanceUID = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    mr.save_as(study / "MR_0001.dcm")
    url = f"sqlite:///{tmp_path / 'index.db'}"
    out = tmp_path / "out"
    code = main(["index", "-i", str(study), "-m", str(tiny_models_root), "--store", url, "-o", str(out)])
    assert code == 3
    results = json.loads((out / "results.json").read_text())
    assert any(r["stage"] == "classify" for r in results["rejected"])
    entries = [series["index"] for series in results["series"] if "index" in series]
    assert entries and all(not entry["indexed"] for entry in entries)
    assert all("classification failed" in entry["reason"] for entry in entries)
    with open_store(url) as store:
        assert store.models() == []


def test_study_with_index_from_the_environment_indexes_too(
    demo_study, tiny_models_root, tmp_path, monkeypatch
):
    folder, files = demo_study
    url = f"sqlite:///{tmp_path / 'index.db'}"
    monkeypatch.setenv("MEDGEMMA_DEPLOY_INDEX", "true")
    monkeypatch.setenv("MEDGEMMA_DEPLOY_STORE", url)
    out = tmp_path / "out"
    args = ["study", "-i", str(folder), "-o", str(out), "-m", str(tiny_models_root), "--max-new-tokens", "2"]
    assert main([*args, "--quiet-tokens"]) == 0
    with open_store(url) as store:
        assert store.models()[0][2] == len(files)
    results = json.loads((out / "results.json").read_text())
    assert all(series["index"]["indexed"] for series in results["series"])


def test_classify_with_an_unreachable_index_is_refused_before_any_work(
    demo_study, tiny_models_root, tmp_path, capsys
):
    folder, _ = demo_study
    out = tmp_path / "out"
    store = "postgresql://indexer:hunter2@127.0.0.1:1/archive"
    code = classify_into_index(folder, out, tiny_models_root, store)
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert "127.0.0.1:1/archive" in line and "hunter2" not in line
    assert not out.exists()


@pytest.fixture(scope="module")
def postgres_url():
    with running_postgres() as server:
        yield fresh_database(server)


def test_index_and_search_on_postgres_hold_no_patient_identifiers(
    postgres_url, demo_study, tiny_models_root, capsys
):
    import psycopg

    folder, files = demo_study
    assert main(["index", "-i", str(folder), "-m", str(tiny_models_root), "--store", postgres_url]) == 0
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    document = search_json(capsys, postgres_url, tiny_models_root, "--like", str(files[0]))
    assert document["hits"][0]["sop_instance_uid"] == source.SOPInstanceUID
    with psycopg.connect(postgres_url) as connection:
        dump = "\n".join(row[0] for row in connection.execute("SELECT t::text FROM medgemma_index_rows t"))
    assert dump.count(source.StudyInstanceUID) == len(files)  # the dump holds every row
    for identifier in (DEMO_PATIENT_NAME, DEMO_PATIENT_ID, str(source.AccessionNumber)):
        assert identifier not in dump, identifier
