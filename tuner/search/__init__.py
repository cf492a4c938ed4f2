"""The search service (design §6): Optuna driver, Ray workers, SQL storage, MLflow tracking, export."""
