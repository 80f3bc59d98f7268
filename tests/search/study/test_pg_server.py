"""The throwaway PostgreSQL server works with SQLAlchemy and Optuna's RDB storage."""

from __future__ import annotations

import optuna
import sqlalchemy as sa


def test_sqlalchemy_roundtrip(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE soup_roundtrip (id INTEGER PRIMARY KEY, name TEXT)"))
            conn.execute(
                sa.text("INSERT INTO soup_roundtrip (id, name) VALUES (:id, :name)"),
                {"id": 1, "name": "broth"},
            )
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, name FROM soup_roundtrip")).all()
            assert [tuple(row) for row in rows] == [(1, "broth")]
            assert conn.execute(sa.text("SELECT current_user")).scalar() == "soup"
    finally:
        engine.dispose()


def test_optuna_rdb_storage(postgres_url: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=postgres_url, study_name="x")
    study.optimize(lambda trial: trial.suggest_float("v", -1.0, 1.0) ** 2, n_trials=3)

    storage = optuna.storages.RDBStorage(postgres_url)
    try:
        loaded = optuna.load_study(study_name="x", storage=storage)
        complete = loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        assert len(complete) == 3
        assert loaded.best_value == min(t.value for t in complete)
    finally:
        storage.remove_session()
        storage.engine.dispose()
