"""The search service (docs/design.md, Search): Optuna driver, Ray workers, SQL storage, MLflow tracking,
export."""
