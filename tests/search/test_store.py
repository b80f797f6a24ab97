"""The store suite: the same tests on the embedded SQLite store and on a real PostgreSQL + pgvector.

The SQLite store runs twice: scanning the table per query, and with its in-memory vector cache
(what ``search-server`` uses).

Each test gets an empty index: a new SQLite file, or a new database on one PostgreSQL server
started for the session (``pgserver``, unix socket).
"""

import numpy as np
import pytest

from medgemma_deploy.search.records import (
    FindingFilter,
    IndexRecord,
    SearchFilters,
    SearchQuery,
    parse_finding_filter,
)
from medgemma_deploy.search.store import ModelMismatchError, StoreError, open_store
from tests.support.search import database_url, fresh_database, running_postgres

DIM = 64
MODEL = "google/medsiglip-448"


@pytest.fixture(scope="module")
def postgres():
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "sqlite-cached", "postgresql"])
def store(request, tmp_path):
    if request.param.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'index.db'}"
    else:
        url = fresh_database(request.getfixturevalue("postgres"))
    with open_store(url, cache_vectors=request.param == "sqlite-cached") as opened:
        yield opened


def unit(rng, n=1):
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def record(vector, sop, *, version="v1", frame=1, modality="CR", body_part="CHEST", date="20240102", **extra):
    return IndexRecord(
        embedding=vector,
        model_name=MODEL,
        model_version=version,
        study_instance_uid=extra.pop("study", "1.2.3"),
        series_instance_uid=extra.pop("series", "1.2.3.4"),
        sop_instance_uid=sop,
        frame_number=frame,
        modality=modality,
        body_part=body_part,
        study_date=date,
        findings=extra.pop("findings", {"pneumothorax": 0.1}),
        **extra,
    )


def fill(store, rng, n=50, **kwargs):
    vectors = unit(rng, n)
    store.add([record(vectors[i], f"1.2.3.4.{i}", **kwargs) for i in range(n)])
    return vectors


def test_nearest_row_comes_back_first_with_its_uids(store):
    rng = np.random.default_rng(0)
    vectors = fill(store, rng)
    query = vectors[17] + 0.01 * unit(rng)[0]
    hits = store.search(query, model_name=MODEL, model_version="v1", top=5)
    assert hits[0].sop_instance_uid == "1.2.3.4.17"
    assert len(hits) == 5
    assert hits[0].score > 0.99
    assert hits[0].score >= hits[1].score >= hits[4].score
    assert (hits[0].study_instance_uid, hits[0].series_instance_uid, hits[0].frame_number) == (
        "1.2.3",
        "1.2.3.4",
        1,
    )


def test_scores_are_cosine_similarities(store):
    rng = np.random.default_rng(1)
    vectors = fill(store, rng, n=10)
    hits = store.search(vectors[0], model_name=MODEL, model_version="v1", top=10)
    by_sop = {h.sop_instance_uid: h.score for h in hits}
    for i in range(10):
        assert by_sop[f"1.2.3.4.{i}"] == pytest.approx(float(vectors[i] @ vectors[0]), abs=1e-5)


def test_reindexing_the_same_frame_and_version_replaces_its_row(store):
    rng = np.random.default_rng(2)
    first, second = unit(rng, 2)
    store.add([record(first, "9.9", findings={"pneumothorax": 0.2})])
    store.add([record(second, "9.9", findings={"pneumothorax": 0.8})])
    assert store.models() == [(MODEL, "v1", 1)]
    (hit,) = store.search(second, model_name=MODEL, model_version="v1")
    assert hit.findings == {"pneumothorax": pytest.approx(0.8)}
    assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_frames_of_one_instance_are_separate_rows(store):
    rng = np.random.default_rng(3)
    a, b = unit(rng, 2)
    store.add([record(a, "9.9", frame=1), record(b, "9.9", frame=2)])
    hits = store.search(b, model_name=MODEL, model_version="v1")
    assert [(h.sop_instance_uid, h.frame_number) for h in hits] == [("9.9", 2), ("9.9", 1)]


def test_a_new_model_version_keeps_both_and_searches_one_at_a_time(store):
    rng = np.random.default_rng(4)
    old, new = unit(rng, 2)
    store.add([record(old, "9.9", version="v1")])
    store.add([record(new, "9.9", version="v2"), record(unit(rng)[0], "9.10", version="v2")])
    assert store.models() == [(MODEL, "v1", 1), (MODEL, "v2", 2)]
    assert [h.sop_instance_uid for h in store.search(new, model_name=MODEL, model_version="v1")] == ["9.9"]
    v2 = store.search(new, model_name=MODEL, model_version="v2")
    assert [h.sop_instance_uid for h in v2] == ["9.9", "9.10"]
    assert v2[0].score == pytest.approx(1.0, abs=1e-5)


def test_another_model_version_is_refused_naming_both(store):
    rng = np.random.default_rng(5)
    fill(store, rng, n=3, version="rev-a")
    assert store.check_model(MODEL, "rev-a") == 3
    with pytest.raises(ModelMismatchError) as raised:
        store.check_model(MODEL, "rev-b")
    message = str(raised.value)
    assert "rev-a" in message and "rev-b" in message and "\n" not in message


def test_an_empty_index_is_refused(store):
    with pytest.raises(StoreError, match="empty"):
        store.check_model(MODEL, "v1")


def test_filters_on_modality_body_part_and_date(store):
    rng = np.random.default_rng(6)
    a, b, c = unit(rng, 3)
    store.add(
        [
            record(a, "1", modality="CR", body_part="CHEST", date="20200101"),
            record(b, "2", modality="CT", body_part="CHEST", date="20220601"),
            record(c, "3", modality="CT", body_part="ABDOMEN", date=None),
        ]
    )

    def sops(**filters):
        hits = store.search(a, model_name=MODEL, model_version="v1", filters=SearchFilters(**filters))
        return sorted(h.sop_instance_uid for h in hits)

    assert sops() == ["1", "2", "3"]
    assert sops(modality="CT") == ["2", "3"]
    assert sops(modality="ct", body_part="chest") == ["2"]
    assert sops(date_from="20210101") == ["2"]
    assert sops(date_to="20211231") == ["1"]
    assert sops(date_from="20200101", date_to="20220601") == ["1", "2"]


def test_filters_on_finding_probability(store):
    rng = np.random.default_rng(7)
    a, b, c = unit(rng, 3)
    store.add(
        [
            record(a, "1", findings={"pneumothorax": 0.9, "effusion": 0.1}),
            record(b, "2", findings={"pneumothorax": 0.4, "effusion": 0.7}),
            record(c, "3", findings={"effusion": 0.95}),
        ]
    )
    filters = SearchFilters(findings=(FindingFilter("pneumothorax", 0.5),))
    assert [
        h.sop_instance_uid for h in store.search(c, model_name=MODEL, model_version="v1", filters=filters)
    ] == ["1"]
    both = SearchFilters(
        findings=(parse_finding_filter("pneumothorax>=0.3"), parse_finding_filter("effusion>=0.5"))
    )
    assert [
        h.sop_instance_uid for h in store.search(a, model_name=MODEL, model_version="v1", filters=both)
    ] == ["2"]
    assert store.finding_keys(MODEL, "v1") == {"pneumothorax", "effusion"}


def test_filtered_search_still_finds_rows_beyond_the_unfiltered_neighbours(store):
    """HNSW post-filters: the one CT among many CRs must still come back (ef_search is raised)."""
    rng = np.random.default_rng(8)
    vectors = unit(rng, 300)
    store.add([record(vectors[i], f"5.{i}", modality="CT" if i == 299 else "CR") for i in range(300)])
    hits = store.search(
        vectors[0], model_name=MODEL, model_version="v1", filters=SearchFilters(modality="CT")
    )
    assert [h.sop_instance_uid for h in hits] == ["5.299"]


def test_thumbnails_and_overlays_round_trip(store):
    rng = np.random.default_rng(9)
    store.add(
        [
            record(
                unit(rng)[0],
                "1",
                thumbnail=b"\x89PNG-thumb",
                overlay=b"\x89PNG-over",
                overlay_finding="pneumothorax",
            ),
            record(unit(rng)[0], "2", thumbnail=b"\x89PNG-only"),
        ]
    )
    hits = {h.sop_instance_uid: h for h in store.search(unit(rng)[0], model_name=MODEL, model_version="v1")}
    assert hits["1"].has_overlay and hits["1"].overlay_finding == "pneumothorax"
    assert not hits["2"].has_overlay
    assert store.image(hits["1"].row_id, "thumbnail") == b"\x89PNG-thumb"
    assert store.image(hits["1"].row_id, "overlay") == b"\x89PNG-over"
    assert store.image(hits["2"].row_id, "overlay") is None
    with pytest.raises(ValueError, match="thumbnail or overlay"):
        store.image(hits["1"].row_id, "pixels")


def test_an_embedding_of_another_size_for_the_same_model_is_refused(store):
    rng = np.random.default_rng(10)
    fill(store, rng, n=2)
    with pytest.raises(ValueError, match="dimensions"):
        store.add([record(np.ones(DIM + 1, np.float32) / np.sqrt(DIM + 1), "7")])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("frame_number", 0, "frame_number"),
        ("study_date", "2024-01-02", "YYYYMMDD"),
        ("embedding", np.array([np.nan, 1.0], np.float32), "NaN"),
    ],
)
def test_bad_records_are_refused(field, value, message):
    kwargs = {"frame": 1, "date": "20240102"}
    vector = np.ones(DIM, np.float32)
    if field == "frame_number":
        kwargs["frame"] = value
    elif field == "study_date":
        kwargs["date"] = value
    else:
        vector = value
    with pytest.raises(ValueError, match=message):
        record(vector, "1", **kwargs)


@pytest.mark.parametrize("text", ["pneumothorax", "pneumothorax>=1.5", ">=0.5", "pneumothorax > 0.5 extra"])
def test_bad_finding_filters_are_refused(text):
    with pytest.raises(ValueError, match="finding filter"):
        parse_finding_filter(text)


def test_bad_dates_in_filters_are_refused():
    with pytest.raises(ValueError, match="date_from"):
        SearchFilters(date_from="2024")


# -- stores that cannot be opened ------------------------------------------------------------------


def test_unreachable_postgres_is_one_line_naming_it():
    url = "postgresql://someone:secret@127.0.0.1:1/archive"
    with pytest.raises(StoreError) as raised:
        open_store(url)
    message = str(raised.value)
    assert "127.0.0.1:1/archive" in message and "cannot connect" in message
    assert "secret" not in message and "\n" not in message


def test_postgres_without_pgvector_says_create_extension(postgres):
    # A database where pgvector is not enabled, opened by a role that may not enable it (not superuser).
    postgres.psql("CREATE ROLE viewer LOGIN; CREATE DATABASE novector OWNER viewer;")
    with pytest.raises(StoreError) as raised:
        open_store(database_url(postgres, "novector", user="viewer"))
    message = str(raised.value)
    assert "CREATE EXTENSION vector" in message and "novector" in message and "\n" not in message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "three slashes"),
        ("sqlite:///no/such/folder/index.db", "does not exist"),
        ("mysql://host/db", "unknown scheme"),
    ],
)
def test_bad_store_urls_are_refused(url, message):
    with pytest.raises(StoreError, match=message):
        open_store(url)


def test_a_file_that_is_not_an_index_is_refused(tmp_path):
    bogus = tmp_path / "notes.db"
    bogus.write_text("not a database, just text that is long enough to have a header" * 20)
    with pytest.raises(StoreError, match=r"notes\.db"):
        open_store(f"sqlite:///{bogus}")


def test_bulk_load_gives_the_rows_that_add_gives(store):
    rng = np.random.default_rng(11)
    vectors = unit(rng, 40)
    batches = [[record(vectors[i], f"6.{i}") for i in range(start, start + 10)] for start in range(0, 40, 10)]
    assert store.bulk_load(batches) == 40
    assert store.models() == [(MODEL, "v1", 40)]
    hits = store.search(vectors[33], model_name=MODEL, model_version="v1", top=3)
    assert hits[0].sop_instance_uid == "6.33"


def test_postgres_keeps_one_cosine_hnsw_index_per_model_version(postgres):
    url = fresh_database(postgres)
    rng = np.random.default_rng(12)
    with open_store(url) as store:
        store.add([record(unit(rng)[0], "1", version="v1")])
        store.bulk_load([[record(unit(rng)[0], "2", version="v2")]])
    name = url.split("/")[3].split("?")[0]
    listing = postgres.psql(f"\\c {name}\nSELECT indexdef FROM pg_indexes WHERE indexdef LIKE '%hnsw%';")
    assert listing.count("USING hnsw") == 2
    assert listing.count("vector_cosine_ops") == 2
    assert "'v1'" in listing and "'v2'" in listing


def test_postgres_search_walks_the_hnsw_index(postgres):
    url = fresh_database(postgres)
    rng = np.random.default_rng(13)
    vectors = unit(rng, 500)
    with open_store(url) as store:
        store.bulk_load([[record(vectors[i], f"7.{i}") for i in range(500)]])
        plan = store.query_plan(SearchQuery(vectors[0], MODEL, "v1", top=10))
        hits = store.search(vectors[0], model_name=MODEL, model_version="v1", top=10)
    assert "hnsw" in plan, plan
    assert hits[0].sop_instance_uid == "7.0"


def test_the_sqlite_vector_cache_sees_rows_written_by_another_connection(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.db'}"
    rng = np.random.default_rng(14)
    first, second = unit(rng, 2)
    with open_store(url, cache_vectors=True) as server, open_store(url) as indexer:
        indexer.add([record(first, "1")])
        assert [h.sop_instance_uid for h in server.search(second, model_name=MODEL, model_version="v1")] == [
            "1"
        ]
        indexer.add([record(second, "2")])
        hits = server.search(second, model_name=MODEL, model_version="v1")
    assert [h.sop_instance_uid for h in hits] == ["2", "1"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
