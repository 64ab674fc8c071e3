"""The exporter's arithmetic: messages as Celery and kombu write them, turned into the figures an
operator scales on.

Messages are produced by a real Celery producer on kombu's in-memory transport, whose
envelope is the one kombu's Redis transport stores (same virtual channel: base64 body,
headers, ``delivery_info``); nothing here opens a socket.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from worker.client import SENT_AT_HEADER
from worker.contract import parse_request
from worker.ops.exporter import (
    DEFAULT_TOKENS_PER_SECOND,
    RATE_MAX_AGE_S,
    Message,
    TokenPolicy,
    allocate_sample,
    parse_message,
    parse_unacked,
    queue_figures,
    reserved_by_queue,
    scaled_tokens,
    select_rate,
)
from worker.settings import Settings

POLICY = TokenPolicy(default=512, limit=4096)
NOW = 1_000_000.0


@pytest.fixture(scope="module")
def producer() -> Iterator[Celery]:
    app = Celery("exporter-unit", broker="memory://")
    app.conf.update(task_serializer="json", accept_content=["json", "pickle"])
    yield app
    app.close()


def sent(producer: Celery, kwargs: dict[str, Any], **options: Any) -> bytes:
    """One ``caption`` message sent by Celery, as kombu's Redis transport stores it."""
    queue = options.pop("queue", f"q-{uuid.uuid4().hex[:8]}")
    producer.send_task("caption", kwargs=kwargs, queue=queue, **options)
    with producer.connection_for_read() as conn:
        envelope = conn.default_channel._get(queue)
    return json.dumps(envelope).encode()


def unacked(raw: bytes, routing_key: str) -> bytes:
    """A value of kombu's ``unacked`` hash for a delivered message (``QoS.append``)."""
    return json.dumps([json.loads(raw), "", routing_key]).encode()


def stamped(at: float) -> dict[str, Any]:
    return {"headers": {SENT_AT_HEADER: at}}


# --- reading messages -----------------------------------------------------------------------


def test_a_celery_message_gives_its_tokens_send_time_and_queue(producer: Celery) -> None:
    raw = sent(
        producer, {"image": "s3://b/k", "max_new_tokens": 8}, queue="photos", **stamped(1234.5)
    )
    assert parse_message(raw) == Message(
        parsed=True, max_new_tokens=8, sent_at=1234.5, routing_keys=frozenset({"photos"}),
        task="caption",
    )  # fmt: skip


def test_a_bulk_shard_message_costs_nothing_its_run_is_costed_instead(producer: Celery) -> None:
    producer.send_task(
        "caption_bulk_shard", kwargs={"run_id": "r", "shard": 0, "run_uri": "s3://b/r/"},
        queue="shards",
    )  # fmt: skip
    with producer.connection_for_read() as conn:
        raw = json.dumps(conn.default_channel._get("shards")).encode()
    message = parse_message(raw)
    assert message.task == "caption_bulk_shard"
    assert TokenPolicy(default=512, limit=4096).tokens(message) == 0


def test_a_celery_protocol_1_message_is_read_too(producer: Celery) -> None:
    old = Celery("exporter-unit-v1", broker="memory://")
    old.conf.update(task_serializer="json", task_protocol=1)
    try:
        message = parse_message(sent(old, {"image": "s3://b/k", "max_new_tokens": 24}))
    finally:
        old.close()
    assert message.parsed and message.max_new_tokens == 24


@pytest.mark.parametrize("limit", [4096, 256, 64])
def test_a_task_without_max_new_tokens_costs_what_the_worker_fills_in(
    producer: Celery, limit: int
) -> None:
    settings = Settings(max_new_tokens_limit=limit)
    policy = TokenPolicy.from_settings(settings)
    for kwargs in ({"image": "s3://b/k"}, {"image": "s3://b/k", "max_new_tokens": None}):
        worker_fills_in = parse_request(kwargs, settings).max_new_tokens
        assert policy.tokens(parse_message(sent(producer, kwargs))) == worker_fills_in


@pytest.mark.parametrize("value", ["8", 0, -3, 5000, True, 8.0])
def test_a_max_new_tokens_the_worker_would_refuse_costs_the_default(
    producer: Celery, value: object
) -> None:
    message = parse_message(sent(producer, {"image": "s3://b/k", "max_new_tokens": value}))
    assert POLICY.tokens(message) == POLICY.default


def _garbled(producer: Celery) -> list[bytes]:
    """Messages whose arguments cannot be read, each still carrying its send time."""
    plain = json.loads(sent(producer, {"image": "s3://b/k", "max_new_tokens": 8}, **stamped(7)))
    not_base64 = {**plain, "body": "%%% not base64 %%%"}
    not_json = {**plain, "body": base64.b64encode(b"[[], {").decode()}
    wrong_shape = {**plain, "body": base64.b64encode(b'{"no": "kwargs"}').decode()}
    bad_encoding = {**plain, "content-encoding": "no-such-codec"}
    kwargs = {"image": "s3://b/k", "max_new_tokens": 8}
    return [
        sent(producer, kwargs, compression="zlib", **stamped(7)),
        sent(producer, kwargs, serializer="pickle", **stamped(7)),
        *(json.dumps(m).encode() for m in (not_base64, not_json, wrong_shape, bad_encoding)),
    ]


def test_messages_whose_arguments_cannot_be_read_keep_their_send_time(producer: Celery) -> None:
    for raw in _garbled(producer):
        message = parse_message(raw)
        assert not message.parsed and message.sent_at == 7.0, raw[:200]
        assert POLICY.tokens(message) == POLICY.default


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff\xfe", b"not json", b"[1, 2, 3]", b"null", b'{"body": 5, "headers": []}'],
)
def test_anything_else_in_a_list_is_an_unparsed_message_not_an_error(raw: bytes) -> None:
    message = parse_message(raw)
    assert not message.parsed and message.sent_at is None


@pytest.mark.parametrize("at", ["1234", True, float("nan"), float("inf"), None])
def test_a_send_time_that_is_not_a_finite_number_is_ignored(producer: Celery, at: Any) -> None:
    raw = sent(producer, {"image": "s3://b/k"}, **stamped(at))
    assert parse_message(raw).sent_at is None


# --- reserved messages ---------------------------------------------------------------------


def test_reserved_messages_are_grouped_by_the_queue_they_were_sent_to(producer: Celery) -> None:
    mine = [sent(producer, {"image": "s3://b/k", "max_new_tokens": n}) for n in (8, 16)]
    theirs = sent(producer, {"image": "s3://b/k", "max_new_tokens": 99})
    entries = [unacked(mine[0], "mine"), unacked(mine[1], "mine"), unacked(theirs, "theirs")]
    entries += [b"garbage", b'[{"body": 1}, "", 7]', b"[1, 2]"]

    grouped = reserved_by_queue(entries, ["mine", "other"])

    assert [POLICY.tokens(m) for m in grouped["mine"]] == [8, 16]
    assert grouped["other"] == []


def test_an_unacked_entry_with_an_unreadable_body_still_counts_for_its_queue() -> None:
    entry = json.dumps([{"body": "%%%", "content-type": "application/json"}, "", "mine"])
    message = parse_unacked(entry)
    assert message is not None and not message.parsed and message.routing_keys == {"mine"}
    assert [m.parsed for m in reserved_by_queue([entry], ["mine"])["mine"]] == [False]


# --- sampling ------------------------------------------------------------------------------


def test_lists_that_fit_the_sample_are_read_whole() -> None:
    assert allocate_sample([10, 0, 5, 0], 1_000) == [10, 0, 5, 0]
    assert allocate_sample([1_000, 0, 0, 0], 1_000) == [1_000, 0, 0, 0]


def test_a_long_queue_is_sampled_in_proportion_and_every_list_is_seen() -> None:
    shares = allocate_sample([90_000, 9_000, 1, 0], 1_000)
    assert shares == [909, 90, 1, 0]  # 1,000 x length / 99,001, at least 1
    assert sum(shares) <= 1_000 + 4
    assert allocate_sample([5, 5, 5, 5], 1) == [1, 1, 1, 1]


def test_the_sampled_token_sum_is_scaled_to_every_waiting_message() -> None:
    assert scaled_tokens([8] * 10, waiting=1_000, default=512) == 8_000
    assert scaled_tokens([8] * 5 + [100] * 5, waiting=100, default=512) == 5_400
    # The lists emptied between counting and reading: whatever is counted costs the default.
    assert scaled_tokens([], waiting=3, default=512) == 1_536


def test_queue_figures_scale_the_sample_and_add_reserved_work_in_full(producer: Celery) -> None:
    sample = [sent(producer, {"image": "s3://b/k", "max_new_tokens": 8}) for _ in range(10)]
    reserved = [parse_message(sent(producer, {"image": "s3://b/k"})) for _ in range(2)]

    figures = queue_figures("q", 1_000, sample, reserved, POLICY, NOW)

    assert (figures.waiting, figures.reserved, figures.sampled) == (1_000, 2, 10)
    assert figures.work_tokens == 1_000 * 8 + 2 * 512
    assert figures.work_seconds(DEFAULT_TOKENS_PER_SECOND) == pytest.approx(90.24)
    assert figures.unparsed == 0


def test_unreadable_messages_are_counted_at_the_default_and_reported(producer: Celery) -> None:
    garbled = _garbled(producer)
    figures = queue_figures("q", len(garbled), garbled, [], POLICY, NOW)
    assert figures.work_tokens == len(garbled) * POLICY.default
    assert figures.unparsed == len(garbled)


# --- oldest age ----------------------------------------------------------------------------


def test_the_oldest_age_is_the_earliest_send_time_in_the_sample(producer: Celery) -> None:
    sample = [
        sent(producer, {"image": "s3://b/k"}, **stamped(NOW - 5)),
        sent(producer, {"image": "s3://b/k"}),  # no header: skipped
        sent(producer, {"image": "s3://b/k"}, **stamped(NOW - 42.5)),
    ]
    assert queue_figures("q", 3, sample, [], POLICY, NOW).oldest_age_s == 42.5


def test_the_oldest_age_is_0_when_nothing_waits_or_nothing_is_stamped(producer: Celery) -> None:
    unstamped = [sent(producer, {"image": "s3://b/k"})]
    assert queue_figures("q", 0, [], [], POLICY, NOW).oldest_age_s == 0.0
    assert queue_figures("q", 1, unstamped, [], POLICY, NOW).oldest_age_s == 0.0
    # A producer whose clock runs ahead of the exporter's: not a negative age.
    ahead = [sent(producer, {"image": "s3://b/k"}, **stamped(NOW + 3))]
    assert queue_figures("q", 1, ahead, [], POLICY, NOW).oldest_age_s == 0.0


def test_reserved_messages_do_not_make_the_queue_look_old(producer: Celery) -> None:
    reserved = [parse_message(sent(producer, {"image": "s3://b/k"}, **stamped(NOW - 900)))]
    assert queue_figures("q", 0, [], reserved, POLICY, NOW).oldest_age_s == 0.0


# --- rates ---------------------------------------------------------------------------------


def report(rate: object, at: object) -> bytes:
    return json.dumps({"generated_tokens_per_second": rate, "at": at}).encode()


def test_the_rate_is_the_median_of_fresh_worker_reports() -> None:
    reports = [report(100.0, NOW - 1), report(250.0, NOW - 60), report(4_000.0, NOW - 200)]
    choice = select_rate(reports, NOW, DEFAULT_TOKENS_PER_SECOND)
    assert (choice.tokens_per_second, choice.source, choice.workers) == (250.0, "measured", 3)


def test_stale_reports_are_ignored() -> None:
    reports = [report(100.0, NOW - 10), report(300.0, NOW - RATE_MAX_AGE_S - 1)]
    choice = select_rate(reports, NOW, DEFAULT_TOKENS_PER_SECOND)
    assert (choice.tokens_per_second, choice.source, choice.workers) == (100.0, "measured", 1)


def test_with_no_fresh_report_the_default_is_used_and_said_so() -> None:
    stale_or_broken = [
        report(300.0, NOW - RATE_MAX_AGE_S - 1),
        report(300.0, NOW + RATE_MAX_AGE_S + 1),  # a clock far ahead is as wrong as one behind
        report(0.0, NOW),
        report(-5.0, NOW),
        report("300", NOW),
        report(300.0, None),
        b"not json",
        b"[]",
    ]
    for reports in ([], stale_or_broken):
        choice = select_rate(reports, NOW, 42.0)
        assert (choice.tokens_per_second, choice.source, choice.workers) == (42.0, "default", 0)


def test_a_worker_whose_clock_runs_a_little_ahead_still_counts() -> None:
    choice = select_rate([report(120.0, NOW + 30)], NOW, DEFAULT_TOKENS_PER_SECOND)
    assert choice.source == "measured" and choice.tokens_per_second == 120.0


def test_the_default_rate_is_conservative_against_the_measured_gpu_rate() -> None:
    # docs/batching.md: Qwen3-VL-32B shape, SDNQ, batch 32, 128 tokens: 32 * 128 / 34.7 s.
    measured_h100 = 32 * 128 / 34.7
    assert measured_h100 >= DEFAULT_TOKENS_PER_SECOND
