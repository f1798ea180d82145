"""A LightningCLI entry point for the adding problem, configured from YAML: a team template.

The Trainer, its callbacks (GradHealth among them), the model and the data all come from the
config file; any value can be overridden on the command line. LightningCLI reads the config with
jsonargparse, which the ``cli`` extra installs: ``pip install -e ".[cli]"``.

Usage:
    python examples/cli.py fit --config examples/configs/adding_lstm.yaml
    python examples/cli.py fit --config examples/configs/adding_lstm.yaml --trainer.max_steps 3 --data.seq_len 20
    python examples/cli.py fit --config examples/configs/adding_lstm.yaml --trainer.callbacks.init_args.init identity
    python examples/cli.py fit --help                     # every option, with its type and default

Then ``tensorboard --logdir runs``: GradHealth's measurements are under ``gradhealth/``.
"""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI

from adding_problem import AddingData, AddingModel


def main(args: list[str] | None = None) -> LightningCLI:
    """Parse ``args`` (default: the command line) and run the subcommand it names."""
    return LightningCLI(AddingModel, AddingData, args=args)


if __name__ == "__main__":
    main()
