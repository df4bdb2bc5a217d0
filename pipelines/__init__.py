"""DVC stage modules: one per stage of dvc.yaml, each the body of one `agecascade` subcommand."""
