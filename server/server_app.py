"""The ServerApp: start from the pretrained encoder and run the federation.

Its settings come from the run config (`[tool.flwr.app.config]` or `flwr run
--run-config`): `encoder-dir` (the pretrained checkpoint), `out-dir`, `num-server-rounds`,
`strategy`, `mode`, the banks' round plan, and `secure-aggregation` (off by default:
docs/secure-aggregation.md). It never sees a head or a row of bank data.
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.checkpoint import (
    load_source_head as load_source_head,  # its home used to be here
)
from fedfin.common.config import FederationConfig, TrainPlanConfig
from fedfin.common.errors import ConfigError
from fedfin.server.federation import run_federation

log = logging.getLogger("fedfin.server")
RoundCallback = Callable[[dict[str, Any]], None]


def federation_config_from_run_config(run_config: dict[str, Any]) -> FederationConfig:
    """Typed settings from Flower's run config; a bad value is a `ConfigError` naming its key."""

    def get(key: str, kind: type, default: Any) -> Any:
        value = run_config.get(key, default)
        if kind is bool:
            return _flag(key, value)
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"run config '{key}' must be {kind.__name__}, got '{value}'"
            ) from None

    defaults = FederationConfig()
    plan = TrainPlanConfig()
    return FederationConfig(
        encoder_dir=get("encoder-dir", str, defaults.encoder_dir),
        out_dir=get("out-dir", str, defaults.out_dir),
        num_rounds=get("num-server-rounds", int, defaults.num_rounds),
        strategy=get("strategy", str, defaults.strategy),
        min_banks=get("min-banks", int, defaults.min_banks),
        fraction_train=get("fraction-train", float, defaults.fraction_train),
        round_timeout=get("round-timeout", float, defaults.round_timeout),
        server_learning_rate=get("server-learning-rate", float, defaults.server_learning_rate),
        proximal_mu=get("proximal-mu", float, defaults.proximal_mu),
        trim_beta=get("trim-beta", float, defaults.trim_beta),
        secure_aggregation=get("secure-aggregation", bool, defaults.secure_aggregation),
        secagg_threshold=get("secagg-threshold", int, defaults.secagg_threshold),
        secagg_clipping_range=get("secagg-clipping-range", float, defaults.secagg_clipping_range),
        train=TrainPlanConfig(
            mode=get("mode", str, plan.mode),
            local_epochs=get("local-epochs", float, plan.local_epochs),
            head_epochs=get("head-epochs", float, plan.head_epochs),
            batch_size=get("batch-size", int, plan.batch_size),
            learning_rate=get("learning-rate", float, plan.learning_rate),
        ),
    )


def _flag(key: str, value: Any) -> bool:
    """A run config switch: a TOML boolean, or true/false written as text."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"run config '{key}' must be true or false, got '{value}'")


def run_server(grid: Grid, config: FederationConfig, on_round: RoundCallback | None = None) -> None:
    if not config.encoder_dir:
        raise ConfigError("run config 'encoder-dir' is required: the pretrained encoder checkpoint")
    if not config.out_dir:
        raise ConfigError("run config 'out-dir' is required: where global checkpoints go")
    encoder_dir = Path(config.encoder_dir)
    start = load_encoder_checkpoint(encoder_dir)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_federation(grid, config, start, load_source_head(encoder_dir), out_dir, on_round)


def build_server_app(
    config: FederationConfig | None = None, on_round: RoundCallback | None = None
) -> ServerApp:
    """A ServerApp with a fixed config (simulation) or one read from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = config or federation_config_from_run_config(dict(context.run_config))
        run_server(grid, settings, on_round)

    return app


app = build_server_app()
