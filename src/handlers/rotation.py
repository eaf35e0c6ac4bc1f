"""Secrets Manager rotation: `aws secretsmanager rotate-secret` or a native schedule on a connection secret."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.utilities.data_classes import SecretsManagerEvent

from core.config import load_settings
from core.rotation import Rotation
from handlers.runtime import build_logger, build_refresher

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

logger = build_logger()
rotation = Rotation(build_refresher(load_settings(), logger), logger)


@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> None:
    """Secrets Manager rotation event: one of the four steps."""
    parsed = SecretsManagerEvent(event)
    logger.append_keys(step=parsed.step)
    rotation.run(parsed.step, parsed.secret_id, parsed.client_request_token)
