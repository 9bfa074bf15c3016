"""The sharded trainer: ``train_and_evaluate(config, workdir)`` runs a whole training job."""
