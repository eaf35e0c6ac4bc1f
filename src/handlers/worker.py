"""SQS: refresh the connections a sweep queued because too many were due for one invocation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from core.clock import utc_now
from core.config import load_settings
from core.errors import ConnectionNotFound
from core.fanout import connection_from_message
from core.lifecycle import Outcome
from core.refresh import time_for_a_refresh
from core.report import report_outcomes
from handlers.runtime import build_logger, build_refresher

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

logger = build_logger()
metrics = Metrics()
processor = BatchProcessor(event_type=EventType.SQS)
settings = load_settings()
refresher = build_refresher(settings, logger)


class NotStarted(Exception):
    """Too little of the invocation is left for one more refresh: SQS delivers the record again later."""


def refresh_record(record: SQSRecord, lambda_context: LambdaContext) -> Outcome | None:
    """`_refresh_record`; a record failing on the last delivery SQS makes is announced before it is dead-lettered."""
    try:
        return _refresh_record(record, lambda_context)
    except Exception as error:
        if int(record.attributes.approximate_receive_count) >= settings.max_receive_count:
            try:
                name: str | None = connection_from_message(record.body)
            except ValueError:
                name = None  # a malformed message: announced without a name
            if refresher.monitor is not None:
                refresher.monitor.dead_lettered(name, type(error).__name__)
            logger.error("queued refresh dead-lettered", extra={"connection": name, "reason": type(error).__name__})
        raise


def _refresh_record(record: SQSRecord, lambda_context: LambdaContext) -> Outcome | None:
    """Re-read the connection (the queue holds only its name) and refresh it if still due.

    Provider failures (and anything unexpected during the refresh) are outcomes, not exceptions: they back off
    and the next sweep retries them, so SQS need not. As in the
    sweep, no refresh starts that might not finish before the timeout (it would be cut off mid-write).
    """
    name = connection_from_message(record.body)
    if not time_for_a_refresh(lambda_context.get_remaining_time_in_millis() / 1000):  # injected by the processor
        raise NotStarted(f"connection {name!r}: too little time left in this invocation; delivered again later")
    try:
        read = refresher.store.get_latest(name)  # with its health tags (backoff) and any candidate adopted
    except ConnectionNotFound:
        logger.warning("queued connection no longer exists", extra={"connection": name})
        return None
    return refresher.safe_refresh(read)


@metrics.log_metrics
@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """SQS event with ReportBatchItemFailures: only records that raised are retried."""
    with processor(records=event.get("Records", []), handler=refresh_record, lambda_context=context):
        processed = processor.process()
    outcomes = [result[1] for result in processed if result[0] == "success" and result[1] is not None]
    report_outcomes(outcomes, logger, metrics, utc_now(), whole_sweep=False)
    return dict(processor.response())
