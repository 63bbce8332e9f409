"""Everything that moves data: params, preparation, training, evaluation, export, inference and the CLI."""
