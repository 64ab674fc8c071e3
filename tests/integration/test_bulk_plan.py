"""Bulk planning against a real S3 HTTP server (moto): listing, inputs, run.json, skipping,
manifests and the allowlists. Nothing here mocks S3."""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from worker.bulk.errors import BucketNotAllowed, DuplicateItemId
from worker.bulk.plan import BulkOptions, PlanSummary, plan_run
from worker.devtools.loopback import LoopbackS3
from worker.settings import Settings

pytestmark = pytest.mark.timeout(180)

MATCHING = 2_000
EXTENSIONS = (".jpg", ".JPG", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".TIFF")
NOT_MATCHING = (
    "photos/notes.txt", "photos/0001.jpg.bak", "photos/doc.pdf", "photos/vector.svg",
    "photos/folder/", "photos2/sibling.jpg", "other/outside.png",
)  # fmt: skip


def put_many(server: LoopbackS3, bucket: str, keys: Iterable[str], body: bytes = b"x") -> None:
    """PUT objects over plain keep-alive HTTP from four threads.

    moto spends about 4 ms on each PUT; boto3's request signing would add about as much
    again on this 2-core machine, and planning never reads bodies, so the fixtures skip it
    (moto does not check signatures).
    """
    local = threading.local()

    def put(key: str) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("PUT", f"/{bucket}/{quote(key)}", body=body)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, (key, response.status)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, keys))


def listing(client: Any, bucket: str, prefix: str = "") -> list[tuple[str, str]]:
    """(key, bare etag) of every object under prefix, as the store lists them."""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [(o["Key"], o["ETag"].strip('"')) for o in page.get("Contents", ())]
    return out


def lines(client: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def run_lines(client: Any, bucket: str, root: str, folder: str) -> Iterator[dict[str, Any]]:
    """Every line of a run's inputs/ or skipped/ shards, in shard order."""
    for key, _ in listing(client, bucket, root + folder):
        yield from lines(client, bucket, key)


def fabricate_outputs(
    client: Any, bucket: str, summary: PlanSummary, status: dict[str, str] | None = None
) -> None:
    """Write shards/NNNNN.output.jsonl for every input shard, as workers will."""
    root = summary.output.split("/", 3)[3]
    run = json.loads(client.get_object(Bucket=bucket, Key=root + "run.json")["Body"].read())
    for shard in range(summary.shards):
        items = lines(client, bucket, f"{root}inputs/{shard:05d}.jsonl")
        out = []
        for item in items:
            state = (status or {}).get(item["id"], "ok")
            out.append({
                "id": item["id"], "image": item["image"], "etag": item["etag"],
                "status": state, "text": "a caption" if state == "ok" else None,
                "finish_reason": "stop", "prompt_tokens": 70, "generated_tokens": 3,
                "model": run["model"], "config": run["config_hash"],
                "error": None if state == "ok" else {"type": "CaptionFailed", "message": "x"},
            })  # fmt: skip
        body = "".join(json.dumps(line) + "\n" for line in out).encode()
        client.put_object(Bucket=bucket, Key=f"{root}shards/{shard:05d}.output.jsonl", Body=body)


@pytest.fixture(scope="module")
def photos(s3_server: LoopbackS3) -> tuple[str, list[tuple[str, str]]]:
    """A bucket with 2,000 images under photos/ (nested, mixed-case extensions) and files
    that must not be taken; returns it with the expected (key, etag) in listing order."""
    client = s3_server.client()
    name = f"photos-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    keys = [
        f"photos/{'sub/' if i % 3 == 0 else ''}{i:04d}{EXTENSIONS[i % len(EXTENSIONS)]}"
        for i in range(MATCHING)
    ]
    put_many(s3_server, name, [*keys, *NOT_MATCHING])
    expected = [(k, e) for k, e in listing(client, name, "photos/") if k in set(keys)]
    assert len(expected) == MATCHING
    return name, expected


@pytest.fixture()
def out(bucket: str) -> str:
    return bucket


def settings_for(source: str, out: str, **more: Any) -> Settings:
    return Settings(model="acme/qwen3-vl", allowed_buckets=(source,), output_buckets=(out,), **more)


def test_dry_run_counts_the_matching_keys_and_writes_nothing(
    photos: tuple[str, list[tuple[str, str]]], out: str, s3_env: dict[str, str], s3_client: Any
) -> None:
    source, _ = photos
    summary = plan_run(
        settings_for(source, out),
        BulkOptions(f"s3://{source}/photos/", f"s3://{out}/runs", dry_run=True),
    )
    print("dry-run JSON:", json.dumps(summary.to_json()))
    assert summary.to_json() == {
        "run_id": None,
        "total": MATCHING,
        "to_caption": MATCHING,
        "skipped": 0,
        "shards": 2,
        "source": f"s3://{source}/photos/",
        "output": f"s3://{out}/runs/",
        "config_hash": summary.config_hash,
    }
    assert listing(s3_client, out) == []


def test_submit_writes_run_json_and_inputs_with_every_key_in_order(
    photos: tuple[str, list[tuple[str, str]]], out: str, s3_env: dict[str, str], s3_client: Any
) -> None:
    source, expected = photos
    argv = ("caption-worker", "bulk", "submit", f"s3://{source}/photos/", "--out", f"s3://{out}/runs",
            "--shard-size", "700")  # fmt: skip
    summary = plan_run(
        settings_for(source, out),
        BulkOptions(
            f"s3://{source}/photos/", f"s3://{out}/runs", shard_size=700, argv=argv,
            arguments={"prompt": "Name the main subject.", "max_new_tokens": 64},
        ),
    )  # fmt: skip
    assert summary.run_id is not None
    root = f"runs/{summary.run_id}/"
    assert summary.output == f"s3://{out}/{root}"
    assert (summary.total, summary.to_caption, summary.skipped, summary.shards) == (
        MATCHING, MATCHING, 0, 3,
    )  # fmt: skip
    assert [k for k, _ in listing(s3_client, out)] == [
        f"{root}inputs/00000.jsonl", f"{root}inputs/00001.jsonl", f"{root}inputs/00002.jsonl",
        f"{root}run.json",
    ]  # fmt: skip
    sizes = [len(lines(s3_client, out, f"{root}inputs/{n:05d}.jsonl")) for n in range(3)]
    assert sizes == [700, 700, 600]
    items = list(run_lines(s3_client, out, root, "inputs/"))
    assert [(i["image"], i["etag"]) for i in items] == [
        (f"s3://{source}/{key}", etag) for key, etag in expected
    ]
    assert [i["id"] for i in items] == [key.removeprefix("photos/") for key, _ in expected]
    assert all(i["size"] == 1 and set(i) == {"id", "image", "etag", "size"} for i in items)

    text = s3_client.get_object(Bucket=out, Key=f"{root}run.json")["Body"].read().decode()
    run = json.loads(text)
    assert run["run_id"] == summary.run_id
    assert run["source"] == f"s3://{source}/photos/" and run["output"] == summary.output
    assert run["model"] == "acme/qwen3-vl" and run["revision"] is None
    assert run["prompt"] == "Name the main subject." and run["max_new_tokens"] == 64
    assert run["generation"]["do_sample"] is False and run["max_pixels"] == 1_048_576
    assert run["config_hash"] == summary.config_hash
    assert run["include"][0] == "*.jpg" and run["exclude"] == []
    assert (run["shard_size"], run["sidecars"], run["if_exists"], run["queue"]) == (
        700, "none", "skip", "captions-bulk",
    )  # fmt: skip
    assert run["argv"] == list(argv)
    assert set(run["versions"]) == {"sdnq-caption-worker", "transformers", "sdnq", "celery"}
    assert run["counts"] == {
        "total": MATCHING, "to_caption": MATCHING, "skipped": 0, "shards": 3,
        "skipped_shards": 0,
    }  # fmt: skip
    for secret in (s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in text


def test_a_second_run_skips_what_the_first_captioned_until_the_config_changes(
    photos: tuple[str, list[tuple[str, str]]], out: str, s3_env: dict[str, str], s3_client: Any
) -> None:
    source, _ = photos
    settings = settings_for(source, out)
    options = BulkOptions(f"s3://{source}/photos/", f"s3://{out}/runs")
    first = plan_run(settings, options)
    fabricate_outputs(s3_client, out, first)

    second = plan_run(settings, options)
    assert (second.total, second.to_caption, second.skipped, second.shards) == (
        MATCHING, 0, MATCHING, 0,
    )  # fmt: skip
    assert second.config_hash == first.config_hash
    root = f"runs/{second.run_id}/"
    assert not listing(s3_client, out, root + "inputs/")
    skipped = list(run_lines(s3_client, out, root, "skipped/"))
    assert len(skipped) == MATCHING
    assert {line["status"] for line in skipped} == {"skipped"}
    assert {line["config"] for line in skipped} == {first.config_hash}
    run = json.loads(s3_client.get_object(Bucket=out, Key=root + "run.json")["Body"].read())
    assert run["counts"]["skipped"] == MATCHING and run["counts"]["skipped_shards"] == 2

    changed = BulkOptions(
        options.source, options.out, arguments={"prompt": "Describe the colours."}, dry_run=True
    )
    again = plan_run(settings, changed)
    assert (again.to_caption, again.skipped) == (MATCHING, 0)
    assert again.config_hash != first.config_hash
    other_model = plan_run(
        settings.model_copy(update={"model": "acme/bigger"}),
        BulkOptions(options.source, options.out, dry_run=True),
    )
    assert (other_model.to_caption, other_model.skipped) == (MATCHING, 0)
    overwrite = plan_run(
        settings, BulkOptions(options.source, options.out, if_exists="overwrite", dry_run=True)
    )
    assert (overwrite.to_caption, overwrite.skipped) == (MATCHING, 0)


def test_changed_bytes_failed_items_and_other_prefixes_are_planned_again(
    s3_server: LoopbackS3, bucket: str, s3_env: dict[str, str], s3_client: Any
) -> None:
    put_many(s3_server, bucket, ["p/a.jpg", "p/b.jpg", "p/c.jpg", "p/d.jpg"])
    settings = settings_for(bucket, bucket)
    options = BulkOptions(f"s3://{bucket}/p/", f"s3://{bucket}/runs")
    first = plan_run(settings, options)
    fabricate_outputs(s3_client, bucket, first, status={"b.jpg": "error"})
    s3_client.put_object(Bucket=bucket, Key="p/c.jpg", Body=b"new bytes")

    again = plan_run(settings, BulkOptions(options.source, options.out, dry_run=True))
    assert (again.total, again.to_caption, again.skipped) == (4, 2, 2)  # b failed, c changed
    elsewhere = plan_run(
        settings, BulkOptions(options.source, f"s3://{bucket}/other-runs", dry_run=True)
    )
    assert elsewhere.to_caption == 4  # skipping looks only under the same --out


def test_a_run_inside_its_source_prefix_never_lists_its_own_files(
    s3_server: LoopbackS3, bucket: str, s3_env: dict[str, str], s3_client: Any
) -> None:
    put_many(s3_server, bucket, ["p/a.jpg", "p/b.json"])
    settings = settings_for(bucket, bucket)
    first = plan_run(settings, BulkOptions(f"s3://{bucket}/p/", f"s3://{bucket}/p/captions"))
    assert first.to_caption == 1
    everything = BulkOptions(f"s3://{bucket}/p/", f"s3://{bucket}/p/captions", include=("*",))
    summary = plan_run(settings, everything)
    assert summary.total == 2  # a.jpg and b.json, not run.json nor inputs/*.jsonl
    root = f"p/captions/{summary.run_id}/"
    assert [i["id"] for i in run_lines(s3_client, bucket, root, "inputs/")] == [
        "a.jpg", "b.json",
    ]  # fmt: skip


# --- Manifests ---------------------------------------------------------------------------------


def test_txt_and_jsonl_manifests_local_and_in_s3(
    photos: tuple[str, list[tuple[str, str]]],
    out: str,
    s3_env: dict[str, str],
    s3_client: Any,
    tmp_path: Path,
) -> None:
    source, expected = photos
    etags = dict(expected)
    (k1, e1), (k2, e2) = expected[0], expected[1]
    missing = "photos/not-there.jpg"
    txt = f"# three images\ns3://{source}/{k1}\n\ns3://{source}/{missing}\ns3://{source}/{k2}\n"
    jsonl = "".join(json.dumps(x) + "\n" for x in [
        {"image": f"s3://{source}/{k1}", "id": "first"},
        {"image": f"s3://{source}/{k2}", "prompt": "Name it.", "max_new_tokens": 20},
        {"image": f"s3://{source}/{missing}", "id": "gone"},
    ])  # fmt: skip
    (tmp_path / "list.txt").write_text(txt)
    (tmp_path / "list.jsonl").write_text(jsonl)
    s3_client.put_object(Bucket=source, Key="lists/list.txt", Body=txt.encode())
    s3_client.put_object(Bucket=source, Key="lists/list.jsonl", Body=jsonl.encode())
    settings = settings_for(source, out)

    want_txt = [
        {"id": "2", "image": f"s3://{source}/{k1}", "etag": e1, "size": 1},
        {"id": "4", "image": f"s3://{source}/{missing}", "etag": None, "size": None},
        {"id": "5", "image": f"s3://{source}/{k2}", "etag": e2, "size": 1},
    ]
    want_jsonl = [
        {"id": "first", "image": f"s3://{source}/{k1}", "etag": etags[k1], "size": 1},
        {"id": "2", "image": f"s3://{source}/{k2}", "etag": e2, "size": 1,
         "prompt": "Name it.", "max_new_tokens": 20},
        {"id": "gone", "image": f"s3://{source}/{missing}", "etag": None, "size": None},
    ]  # fmt: skip
    for manifest, want in [
        (str(tmp_path / "list.txt"), want_txt),
        (f"s3://{source}/lists/list.txt", want_txt),
        (str(tmp_path / "list.jsonl"), want_jsonl),
        (f"s3://{source}/lists/list.jsonl", want_jsonl),
    ]:
        summary = plan_run(settings, BulkOptions(manifest, f"s3://{out}/m"))
        assert (summary.total, summary.to_caption, summary.shards) == (3, 3, 1), manifest
        root = f"m/{summary.run_id}/"
        assert list(run_lines(s3_client, out, root, "inputs/")) == want, manifest
        run = json.loads(s3_client.get_object(Bucket=out, Key=root + "run.json")["Body"].read())
        assert run["source_kind"] == "manifest" and run["include"] is None


def test_manifest_items_with_overrides_are_skipped_by_their_own_config(
    photos: tuple[str, list[tuple[str, str]]],
    out: str,
    s3_env: dict[str, str],
    s3_client: Any,
    tmp_path: Path,
) -> None:
    source, expected = photos
    (k1, _), (k2, _) = expected[0], expected[1]
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(
        json.dumps({"image": f"s3://{source}/{k1}"}) + "\n"
        + json.dumps({"image": f"s3://{source}/{k2}", "max_new_tokens": 20}) + "\n"
    )  # fmt: skip
    settings = settings_for(source, out)
    first = plan_run(settings, BulkOptions(str(manifest), f"s3://{out}/m"))
    # Workers write the item's own config on its line; only k1's is the run's hash.
    from worker.bulk.identity import RunConfig

    item_config = RunConfig.from_arguments(settings, {}).item_config(None, 20)
    root = f"m/{first.run_id}/"
    items = list(run_lines(s3_client, out, root, "inputs/"))
    body = "".join(
        json.dumps({**i, "status": "ok", "config": c}) + "\n"
        for i, c in zip(items, [first.config_hash, item_config], strict=True)
    )
    s3_client.put_object(Bucket=out, Key=f"{root}shards/00000.output.jsonl", Body=body.encode())
    again = plan_run(settings, BulkOptions(str(manifest), f"s3://{out}/m", dry_run=True))
    assert (again.to_caption, again.skipped) == (0, 2)


def test_duplicate_manifest_ids_are_refused_naming_the_lines_and_nothing_is_written(
    photos: tuple[str, list[tuple[str, str]]],
    out: str,
    s3_env: dict[str, str],
    s3_client: Any,
    tmp_path: Path,
) -> None:
    source, _ = photos
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(
        json.dumps({"image": f"s3://{source}/a.jpg", "id": "x"}) + "\n"
        + json.dumps({"image": f"s3://{source}/b.jpg", "id": "3"}) + "\n"
        + json.dumps({"image": f"s3://{source}/c.jpg"}) + "\n"  # id "3" by line number
    )  # fmt: skip
    with pytest.raises(
        DuplicateItemId, match=r"manifest line 3: id '3' was already given on line 2"
    ):
        plan_run(settings_for(source, out), BulkOptions(str(manifest), f"s3://{out}/m"))
    assert listing(s3_client, out) == []


# --- Allowlists --------------------------------------------------------------------------------


def test_an_output_bucket_outside_the_allowlist_is_refused_and_nothing_is_written(
    photos: tuple[str, list[tuple[str, str]]], out: str, s3_env: dict[str, str], s3_client: Any
) -> None:
    source, _ = photos
    settings = Settings(allowed_buckets=(source,), output_buckets=("captions-only",))
    with pytest.raises(BucketNotAllowed, match=f"bucket '{out}' is not in CAPTION_OUTPUT_BUCKETS"):
        plan_run(settings, BulkOptions(f"s3://{source}/photos/", f"s3://{out}/runs"))
    assert listing(s3_client, out) == []


def test_a_manifest_line_outside_the_read_allowlist_refuses_the_run(
    photos: tuple[str, list[tuple[str, str]]],
    out: str,
    s3_env: dict[str, str],
    s3_client: Any,
    tmp_path: Path,
) -> None:
    source, expected = photos
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"s3://{source}/{expected[0][0]}\ns3://private-bucket/x.jpg\n")
    with pytest.raises(BucketNotAllowed, match="manifest line 2: bucket 'private-bucket'"):
        plan_run(settings_for(source, out), BulkOptions(str(manifest), f"s3://{out}/m"))
    assert listing(s3_client, out) == []


def test_an_empty_allowlist_allows_any_bucket(
    photos: tuple[str, list[tuple[str, str]]], out: str, s3_env: dict[str, str]
) -> None:
    source, _ = photos
    summary = plan_run(
        Settings(), BulkOptions(f"s3://{source}/photos/sub/", f"s3://{out}/r", dry_run=True)
    )
    assert summary.total == len(range(0, MATCHING, 3))
