"""Secrets Manager rotation: `aws secretsmanager rotate-secret` or a native schedule on a connection secret."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
    # The event's three fields, read as Powertools' SecretsManagerEvent reads them: its data_classes package
    # imports every event source's class, a tenth of this function's cold start, for three keys.
    step, secret_id, token = event["Step"], event["SecretId"], event["ClientRequestToken"]
    logger.append_keys(step=step)
    rotation.run(step, secret_id, token)
